//! Messages between two nodes inside their WireGuard session: path MTU probes and acks, pings,
//! the birthday join, punch rounds and loss reports.
//!
//! Each message is a tiny IPv4 packet that the sender encrypts like any inner packet, from its
//! overlay address to the peer's, with IP protocol [`PROTO`] (253, set aside for experiments by
//! RFC 3692, so no real transport uses it):
//!
//! ```text
//! [IPv4 header: 20 bytes, DF, TTL 64, total length 33]
//! [MAGIC "meshpmtu"][kind u8][id u16][size u16][zero padding]
//! ```
//!
//! The zeros pad the packet to the size being probed. The IPv4 total length counts only the 33
//! bytes of the message, so the receiving WireGuard trims the padding off. The receiving node
//! takes a packet that [`parse`] recognises out of the stream: it never reaches its TUN device.
//!
//! What each [`Kind`] asks of the receiver:
//! - [`Kind::Probe`]: send back an [`Kind::Ack`] with the same id and size. Ids below 0x8000
//!   belong to the path MTU search and the probe is padded to its `size`; ids from 0x8000 up
//!   (mesh-core's `node::PING_IDS`) are pings, for liveness and round-trip time, and go
//!   unpadded with `size` 0.
//! - [`Kind::Ack`]: nothing to answer. The sender of the probe matches it by id: a ping's gives a
//!   round-trip time, a path MTU probe's tells the search that `size` passed.
//! - [`Kind::Birthday`]: the sender is starting a birthday hole-punching attempt toward the
//!   receiver now (id and size 0); the receiver starts one too, so both run at the same time.
//! - [`Kind::Punch`]: the sender has just primed its own NAT toward the receiver's candidates
//!   (probes with a TTL too low to reach the receiver's gateway) and asks the receiver to probe
//!   the sender's candidates now, then answer with a [`Kind::PunchAck`] with the same id (size
//!   0).
//! - [`Kind::PunchAck`]: the receiver of a punch has probed; the sender of the punch now probes
//!   the receiver's candidates too, through the holes those probes opened.
//!
//! Kind 6 is a [`LossReport`]: what the sender received of the receiver's WireGuard data on one
//! path, which the receiver compares with what it sent there. Its body is longer than the
//! others' (see [`REPORT_LEN`]), so it is not a [`Message`]: [`parse`] leaves it alone and
//! [`parse_report`] reads it.
//!
//! This module only reads and writes the bytes; which ids are in flight and what to do about
//! them is the node's business.

use std::net::Ipv4Addr;

/// IP protocol number of in-tunnel messages (RFC 3692 experimental).
pub const PROTO: u8 = 253;
/// The first bytes after the IPv4 header of every in-tunnel message.
pub const MAGIC: &[u8; 8] = b"meshpmtu";
/// Bytes of an IPv4 header without options.
pub const IPV4_HEADER: usize = 20;
/// Bytes after the IPv4 header: magic, kind, id and size.
const BODY: usize = MAGIC.len() + 1 + 2 + 2;
/// Bytes of a message without padding; also the IPv4 total length it carries.
pub const LEN: usize = IPV4_HEADER + BODY;
/// The kind byte of a [`LossReport`].
pub const REPORT_KIND: u8 = 6;
/// Bytes a [`LossReport`] adds after the common part: path, receiver index, first and last
/// counter, packets received.
const REPORT_BODY: usize = 1 + 4 + 8 + 8 + 4;
/// Bytes of a loss report; also the IPv4 total length it carries.
pub const REPORT_LEN: usize = LEN + REPORT_BODY;
/// Most WireGuard counters one report may span (`last - first + 1`) and most packets it may
/// count: 2^24, far beyond what one sender can send on one path between two reports (a second
/// of 10 Gbit/s in 1,400-byte packets is under a million).
pub const MAX_REPORT_SPAN: u64 = 1 << 24;

/// What a message asks of its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "Did this size arrive?" The receiver answers with an [`Kind::Ack`].
    Probe = 1,
    /// "It did." The answer to a probe, with its id and size.
    Ack = 2,
    /// "I am starting a birthday attempt toward you now: join it."
    Birthday = 3,
    /// "My NAT is primed toward your candidates: probe mine now, then acknowledge."
    Punch = 4,
    /// "I probed yours: probe mine."
    PunchAck = 5,
}

impl Kind {
    fn from_wire(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Probe),
            2 => Some(Kind::Ack),
            3 => Some(Kind::Birthday),
            4 => Some(Kind::Punch),
            5 => Some(Kind::PunchAck),
            _ => None,
        }
    }
}

/// One in-tunnel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Probe, ack or birthday join.
    pub kind: Kind,
    /// Matches an ack to its probe (0 in a join).
    pub id: u16,
    /// Size of the packet that was probed (0 in a ping or join).
    pub size: u16,
}

/// The Internet checksum (RFC 1071) of `bytes`: the ones' complement of their ones' complement
/// sum as big-endian 16-bit words, an odd last byte padded with zero. Over a header that
/// already holds its checksum, it is 0.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
        // Folding as we go keeps the sum within 17 bits whatever the length.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes an IPv4 header without options: DF set, TTL 64, identification 0, and its checksum.
pub fn write_ipv4_header(
    header: &mut [u8; IPV4_HEADER],
    total_len: u16,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) {
    *header = [0; IPV4_HEADER];
    header[0] = 0x45; // version 4, 5 words
    header[2..4].copy_from_slice(&total_len.to_be_bytes());
    header[6] = 0x40; // DF
    header[8] = 64;
    header[9] = proto;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let checksum = internet_checksum(header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// Writes `msg` from `src` to `dst` at the start of `buf`, padded with zeros to `pad_to` bytes
/// (at least [`LEN`]). Returns the bytes written, or `None` (leaving `buf` as it may be) when
/// they do not fit.
pub fn build_into(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    msg: Message,
    pad_to: usize,
    buf: &mut [u8],
) -> Option<usize> {
    let len = pad_to.max(LEN);
    let (header, rest) = buf.get_mut(..len)?.split_first_chunk_mut::<IPV4_HEADER>()?;
    write_ipv4_header(header, LEN as u16, PROTO, src, dst);
    let (body, padding) = rest.split_at_mut(BODY);
    body[..8].copy_from_slice(MAGIC);
    body[8] = msg.kind as u8;
    body[9..11].copy_from_slice(&msg.id.to_be_bytes());
    body[11..13].copy_from_slice(&msg.size.to_be_bytes());
    padding.fill(0);
    Some(len)
}

/// Builds `msg` from `src` to `dst`, padded with zeros to `pad_to` bytes (at least [`LEN`]).
pub fn build(src: Ipv4Addr, dst: Ipv4Addr, msg: Message, pad_to: usize) -> Vec<u8> {
    let mut packet = vec![0u8; pad_to.max(LEN)];
    let written = build_into(src, dst, msg, pad_to, &mut packet);
    debug_assert_eq!(written, Some(packet.len()));
    packet
}

/// Recognises an in-tunnel message in a decrypted inner packet; `None` for any other packet
/// (the node then treats it as ordinary traffic). Padding, if still present, is ignored; the
/// header checksum is not checked, since WireGuard has already authenticated the packet.
pub fn parse(packet: &[u8]) -> Option<Message> {
    if packet.len() < LEN || packet[0] != 0x45 || packet[9] != PROTO {
        return None;
    }
    let body = &packet[IPV4_HEADER..LEN];
    if &body[..8] != MAGIC {
        return None;
    }
    Some(Message {
        kind: Kind::from_wire(body[8])?,
        id: u16::from_be_bytes([body[9], body[10]]),
        size: u16::from_be_bytes([body[11], body[12]]),
    })
}

/// The path a [`LossReport`] counts, as its sender (the receiver of the data) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportPath {
    /// Datagrams that came straight over UDP (from any address of the peer).
    Direct = 1,
    /// Datagrams the relay carried.
    Relay = 2,
}

impl ReportPath {
    fn from_wire(byte: u8) -> Option<ReportPath> {
        match byte {
            1 => Some(ReportPath::Direct),
            2 => Some(ReportPath::Relay),
            _ => None,
        }
    }
}

/// "Of your WireGuard data messages of session `index` with counters `first..=last`, this many
/// reached me on `path`." The node that receives data sends one per path about once a second
/// while data flows; the node that sent the data knows which of those counters it sent on that
/// path, and so how many were lost.
///
/// `received` counts the messages that arrived on the path since the previous report, which
/// may include a few with counters before `first` that arrived late (reordered): the two sides
/// sum reports over a window, where these even out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossReport {
    /// The path the messages arrived on.
    pub path: ReportPath,
    /// The WireGuard receiver index of the session (bytes 4..8 of its data messages): counters
    /// start over with every session, and the index names it.
    pub index: u32,
    /// Lowest counter of the span (the one after the previous report's `last`, or the first
    /// seen on this path in this session).
    pub first: u64,
    /// Highest counter seen on the path so far.
    pub last: u64,
    /// Messages that arrived on the path since the previous report.
    pub received: u32,
}

/// Why a kind-6 message is not a valid [`LossReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Shorter than [`REPORT_LEN`].
    #[error("loss report shorter than {REPORT_LEN} bytes")]
    Short,
    /// A path byte other than 1 (direct) or 2 (relay).
    #[error("loss report for unknown path {0}")]
    UnknownPath(u8),
    /// `first` after `last`, a span over [`MAX_REPORT_SPAN`], or more packets than that.
    #[error("loss report out of bounds")]
    OutOfBounds,
}

/// Writes report number `id` from `src` to `dst` at the start of `buf`. Returns the bytes
/// written ([`REPORT_LEN`]), or `None` when they do not fit.
pub fn build_report_into(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    report: &LossReport,
    buf: &mut [u8],
) -> Option<usize> {
    let (header, rest) = buf
        .get_mut(..REPORT_LEN)?
        .split_first_chunk_mut::<IPV4_HEADER>()?;
    write_ipv4_header(header, REPORT_LEN as u16, PROTO, src, dst);
    rest[..8].copy_from_slice(MAGIC);
    rest[8] = REPORT_KIND;
    rest[9..11].copy_from_slice(&id.to_be_bytes());
    rest[11..13].fill(0);
    let body = &mut rest[BODY..];
    body[0] = report.path as u8;
    body[1..5].copy_from_slice(&report.index.to_be_bytes());
    body[5..13].copy_from_slice(&report.first.to_be_bytes());
    body[13..21].copy_from_slice(&report.last.to_be_bytes());
    body[21..25].copy_from_slice(&report.received.to_be_bytes());
    Some(REPORT_LEN)
}

/// Builds report number `id` from `src` to `dst`.
pub fn build_report(src: Ipv4Addr, dst: Ipv4Addr, id: u16, report: &LossReport) -> Vec<u8> {
    let mut packet = vec![0u8; REPORT_LEN];
    let written = build_report_into(src, dst, id, report, &mut packet);
    debug_assert_eq!(written, Some(REPORT_LEN));
    packet
}

/// Recognises a loss report in a decrypted inner packet: `None` when the packet is no in-tunnel
/// message of kind 6 (ordinary traffic, or another kind: see [`parse`]); `Some(Err)` when it is
/// one but malformed (the node counts and drops it); otherwise the report and its number.
pub fn parse_report(packet: &[u8]) -> Option<Result<(u16, LossReport), ReportError>> {
    if packet.len() < LEN || packet[0] != 0x45 || packet[9] != PROTO {
        return None;
    }
    let common = &packet[IPV4_HEADER..LEN];
    if &common[..8] != MAGIC || common[8] != REPORT_KIND {
        return None;
    }
    let id = u16::from_be_bytes([common[9], common[10]]);
    let Some(body) = packet.get(LEN..REPORT_LEN) else {
        return Some(Err(ReportError::Short));
    };
    let Some(path) = ReportPath::from_wire(body[0]) else {
        return Some(Err(ReportError::UnknownPath(body[0])));
    };
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let report = LossReport {
        path,
        index: u32::from_be_bytes([body[1], body[2], body[3], body[4]]),
        first: word(5),
        last: word(13),
        received: u32::from_be_bytes([body[21], body[22], body[23], body[24]]),
    };
    let bounded = report.first <= report.last
        && report.last - report.first < MAX_REPORT_SPAN
        && u64::from(report.received) <= MAX_REPORT_SPAN;
    if !bounded {
        return Some(Err(ReportError::OutOfBounds));
    }
    Some(Ok((id, report)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn msg(kind: Kind, id: u16, size: u16) -> Message {
        Message { kind, id, size }
    }

    #[test]
    fn every_kind_round_trips() {
        for m in [
            msg(Kind::Probe, 7, 1420),
            msg(Kind::Probe, 0x8000, 0),
            msg(Kind::Ack, 7, 1420),
            msg(Kind::Birthday, 0, 0),
            msg(Kind::Punch, 3, 0),
            msg(Kind::PunchAck, 3, 0),
        ] {
            let p = build(A, B, m, 0);
            assert_eq!(p.len(), 33);
            assert_eq!(parse(&p), Some(m));
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        let p = build(A, B, msg(Kind::Ack, 0x1234, 1400), 0);
        assert_eq!(p[0], 0x45, "IPv4, no options");
        assert_eq!(p[6], 0x40, "DF");
        assert_eq!(p[9], 253, "RFC 3692 experimental protocol");
        assert_eq!(&p[12..16], &A.octets());
        assert_eq!(&p[16..20], &B.octets());
        assert_eq!(&p[20..28], b"meshpmtu");
        assert_eq!(&p[28..33], &[2, 0x12, 0x34, 0x05, 0x78]);
    }

    #[test]
    fn a_probe_is_padded_but_its_ip_length_is_not() {
        let m = msg(Kind::Probe, 7, 1420);
        let p = build(A, B, m, 1420);
        assert_eq!(p.len(), 1420);
        assert_eq!(
            u16::from_be_bytes([p[2], p[3]]),
            33,
            "IP length excludes padding"
        );
        assert!(p[33..].iter().all(|&b| b == 0), "zero padding");
        assert_eq!(parse(&p), Some(m));
        assert_eq!(parse(&p[..33]), Some(m), "trimmed as WireGuard delivers it");
        assert_eq!(
            build(A, B, m, 10).len(),
            33,
            "never shorter than the message"
        );
    }

    #[test]
    fn the_header_checksum_is_valid() {
        for pad_to in [0, 1280, 1420] {
            let p = build(A, B, msg(Kind::Probe, 9, 1280), pad_to);
            assert_eq!(internet_checksum(&p[..IPV4_HEADER]), 0);
        }
    }

    #[test]
    fn the_checksum_matches_rfc_1071() {
        // RFC 1071 section 3's example words sum (with carries folded) to 0xddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&bytes), !0xddf2);
        assert_eq!(
            internet_checksum(&[0xab]),
            !0xab00,
            "odd byte padded with zero"
        );
        assert_eq!(internet_checksum(&[]), 0xffff);
    }

    #[test]
    fn other_packets_are_not_messages() {
        let good = build(A, B, msg(Kind::Probe, 1, 1280), 0);
        let mut magic = good.clone();
        magic[27] ^= 1;
        assert_eq!(parse(&magic), None, "wrong magic");
        let mut proto = good.clone();
        proto[9] = 17;
        assert_eq!(parse(&proto), None, "UDP");
        let mut options = good.clone();
        options[0] = 0x46;
        assert_eq!(parse(&options), None, "IP options");
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse(&v6), None, "IPv6");
        for kind in [0, 7, 255] {
            let mut unknown = good.clone();
            unknown[28] = kind;
            assert_eq!(parse(&unknown), None, "kind {kind}");
            assert_eq!(parse_report(&unknown), None, "kind {kind}");
        }
        assert_eq!(parse(&good[..32]), None, "short");
        assert_eq!(parse(&[0x45; 10]), None);
        assert_eq!(parse(&[]), None);
    }

    #[test]
    fn build_into_writes_what_build_returns() {
        let m = msg(Kind::Probe, 3, 1300);
        let mut buf = [0xee; 1500];
        assert_eq!(build_into(A, B, m, 1300, &mut buf), Some(1300));
        assert_eq!(&buf[..1300], &build(A, B, m, 1300)[..], "old bytes zeroed");
        assert_eq!(buf[1300], 0xee, "nothing written past the message");
        assert_eq!(build_into(A, B, m, 0, &mut buf), Some(LEN));
        assert_eq!(&buf[..LEN], &build(A, B, m, 0)[..]);
    }

    #[test]
    fn build_into_a_too_small_buffer_is_none() {
        let m = msg(Kind::Probe, 3, 1300);
        assert_eq!(build_into(A, B, m, 0, &mut [0; LEN - 1]), None);
        assert_eq!(build_into(A, B, m, 1300, &mut [0; 1299]), None);
        assert_eq!(build_into(A, B, m, 0, &mut []), None);
        assert_eq!(build_into(A, B, m, 1300, &mut [0; 1300]), Some(1300));
    }

    fn report(path: ReportPath, first: u64, last: u64, received: u32) -> LossReport {
        LossReport {
            path,
            index: 0x0102_0304,
            first,
            last,
            received,
        }
    }

    #[test]
    fn a_loss_report_round_trips() {
        for r in [
            report(ReportPath::Direct, 0, 0, 1),
            report(ReportPath::Relay, 1000, 1999, 987),
            report(ReportPath::Direct, u64::MAX - 5, u64::MAX, 0),
            report(
                ReportPath::Relay,
                7,
                7 + MAX_REPORT_SPAN - 1,
                MAX_REPORT_SPAN as u32,
            ),
        ] {
            let p = build_report(A, B, 42, &r);
            assert_eq!(p.len(), REPORT_LEN);
            assert_eq!(parse_report(&p), Some(Ok((42, r))));
            assert_eq!(internet_checksum(&p[..IPV4_HEADER]), 0);
        }
    }

    #[test]
    fn the_report_layout_is_as_documented() {
        let r = LossReport {
            path: ReportPath::Relay,
            index: 0x0a0b_0c0d,
            first: 0x0102,
            last: 0x0304,
            received: 0x0506,
        };
        let p = build_report(A, B, 0x1234, &r);
        assert_eq!(REPORT_LEN, 58);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 58, "IP length");
        assert_eq!(p[9], 253);
        assert_eq!(&p[20..28], b"meshpmtu");
        assert_eq!(&p[28..33], &[6, 0x12, 0x34, 0, 0], "kind, id, size 0");
        assert_eq!(p[33], 2, "path: relay");
        assert_eq!(&p[34..38], &[0x0a, 0x0b, 0x0c, 0x0d], "receiver index");
        assert_eq!(&p[38..46], &[0, 0, 0, 0, 0, 0, 1, 2], "first counter");
        assert_eq!(&p[46..54], &[0, 0, 0, 0, 0, 0, 3, 4], "last counter");
        assert_eq!(&p[54..58], &[0, 0, 5, 6], "received");
    }

    #[test]
    fn reports_and_messages_are_told_apart() {
        let p = build_report(A, B, 1, &report(ReportPath::Direct, 1, 2, 2));
        assert_eq!(parse(&p), None, "a report is no Message");
        for kind in [
            Kind::Probe,
            Kind::Ack,
            Kind::Birthday,
            Kind::Punch,
            Kind::PunchAck,
        ] {
            let m = build(A, B, msg(kind, 1, 0), REPORT_LEN);
            assert_eq!(parse_report(&m), None, "{kind:?} is no report");
        }
        assert_eq!(parse_report(&[0x45; 10]), None);
        assert_eq!(parse_report(&[]), None);
    }

    #[test]
    fn malformed_reports_are_errors() {
        let good = build_report(A, B, 9, &report(ReportPath::Direct, 10, 20, 11));
        assert_eq!(
            parse_report(&good[..REPORT_LEN - 1]),
            Some(Err(ReportError::Short))
        );
        assert_eq!(parse_report(&good[..LEN]), Some(Err(ReportError::Short)));
        for path in [0, 3, 255] {
            let mut bad = good.clone();
            bad[33] = path;
            assert_eq!(
                parse_report(&bad),
                Some(Err(ReportError::UnknownPath(path)))
            );
        }
        let backwards = build_report(A, B, 9, &report(ReportPath::Direct, 21, 20, 0));
        assert_eq!(
            parse_report(&backwards),
            Some(Err(ReportError::OutOfBounds))
        );
        let wide = build_report(A, B, 9, &report(ReportPath::Relay, 0, MAX_REPORT_SPAN, 1));
        assert_eq!(parse_report(&wide), Some(Err(ReportError::OutOfBounds)));
        let many = build_report(A, B, 9, &report(ReportPath::Relay, 0, 1, u32::MAX));
        assert_eq!(parse_report(&many), Some(Err(ReportError::OutOfBounds)));
        // Padding after the report (a future, longer version) is ignored.
        let mut longer = good.clone();
        longer.extend_from_slice(&[0xee; 8]);
        assert_eq!(parse_report(&longer), parse_report(&good));
    }

    #[test]
    fn build_report_into_a_too_small_buffer_is_none() {
        let r = report(ReportPath::Direct, 1, 2, 2);
        assert_eq!(
            build_report_into(A, B, 1, &r, &mut [0; REPORT_LEN - 1]),
            None
        );
        assert_eq!(build_report_into(A, B, 1, &r, &mut []), None);
        let mut buf = [0xee; REPORT_LEN + 1];
        assert_eq!(build_report_into(A, B, 1, &r, &mut buf), Some(REPORT_LEN));
        assert_eq!(&buf[..REPORT_LEN], &build_report(A, B, 1, &r)[..]);
        assert_eq!(buf[REPORT_LEN], 0xee, "nothing written past the report");
    }

    fn any_report() -> impl Strategy<Value = LossReport> {
        let path = prop_oneof![Just(ReportPath::Direct), Just(ReportPath::Relay)];
        (
            path,
            any::<u32>(),
            any::<u64>(),
            0..MAX_REPORT_SPAN,
            0..=MAX_REPORT_SPAN as u32,
        )
            .prop_map(|(path, index, first, span, received)| LossReport {
                path,
                index,
                first: first.min(u64::MAX - span),
                last: first.min(u64::MAX - span) + span,
                received,
            })
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let kind = prop_oneof![Just(Kind::Probe), Just(Kind::Ack), Just(Kind::Birthday)];
        (kind, any::<u16>(), any::<u16>()).prop_map(|(kind, id, size)| Message { kind, id, size })
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn build_then_parse_round_trips(m in any_message(), pad_to in 0usize..2000) {
            let p = build(A, B, m, pad_to);
            prop_assert_eq!(p.len(), pad_to.max(LEN));
            prop_assert_eq!(parse(&p), Some(m));
            prop_assert_eq!(internet_checksum(&p[..IPV4_HEADER]), 0);
        }

        #[test]
        fn parse_report_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some(Ok((_, r))) = parse_report(&bytes) {
                prop_assert!(r.first <= r.last && r.last - r.first < MAX_REPORT_SPAN);
                prop_assert!(u64::from(r.received) <= MAX_REPORT_SPAN);
            }
        }

        #[test]
        fn build_report_then_parse_round_trips(r in any_report(), id in any::<u16>()) {
            let p = build_report(A, B, id, &r);
            prop_assert_eq!(parse_report(&p), Some(Ok((id, r))));
            prop_assert_eq!(parse(&p), None);
        }

        #[test]
        fn a_report_with_any_byte_changed_never_panics(
            r in any_report(),
            at in 0usize..REPORT_LEN,
            byte in any::<u8>(),
            cut in 0usize..=REPORT_LEN,
        ) {
            let mut p = build_report(A, B, 1, &r);
            p[at] = byte;
            p.truncate(cut);
            if let Some(Ok((_, r))) = parse_report(&p) {
                prop_assert!(r.first <= r.last && r.last - r.first < MAX_REPORT_SPAN);
            }
        }

        #[test]
        fn build_into_never_panics(
            m in any_message(),
            pad_to in 0usize..200,
            len in 0usize..200,
        ) {
            let mut buf = vec![0xee; len];
            let written = build_into(A, B, m, pad_to, &mut buf);
            prop_assert_eq!(written.is_some(), len >= pad_to.max(LEN));
            if let Some(n) = written {
                prop_assert_eq!(parse(&buf[..n]), Some(m));
            }
        }
    }
}
