//! Messages between two nodes inside their WireGuard session: path MTU probes and acks, pings,
//! and the birthday join.
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
        for kind in [0, 6, 255] {
            let mut unknown = good.clone();
            unknown[28] = kind;
            assert_eq!(parse(&unknown), None, "kind {kind}");
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
