//! IP packets as mesh-core reads them: the routing view, ICMP "fragmentation needed" built from
//! a packet, and the in-tunnel path MTU / ping / birthday messages.

use super::{check, Decoder};
use crate::Outcome;
use mesh_core::node::PING_IDS;
use mesh_core::{packet, pmtu};
use mesh_proto::tunnel::{self, Kind, Message};
use std::net::Ipv4Addr;

/// An IPv4 packet with a header of `ihl` words (options zero) and `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ihl: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let header = usize::from(ihl) * 4;
    let mut p = vec![0u8; header + payload.len()];
    p[0] = 0x40 | ihl;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[6] = flags;
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[..header]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[header..].copy_from_slice(payload);
    p
}

/// Real inner packets from `src` to `dst`: path MTU probes and acks, pings, birthday joins,
/// ICMP, UDP and TCP, a fragment, IP options, an IPv6 packet.
pub(super) fn inner_packets(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Vec<u8>> {
    let msg = |kind, id, size| Message { kind, id, size };
    let mut out = vec![
        tunnel::build(src, dst, msg(Kind::Probe, 1, 1280), 0),
        tunnel::build(src, dst, msg(Kind::Probe, 2, 1420), 1420),
        tunnel::build(src, dst, msg(Kind::Ack, 2, 1420), 0),
        tunnel::build(src, dst, msg(Kind::Probe, PING_IDS.start, 0), 0),
        tunnel::build(src, dst, msg(Kind::Ack, PING_IDS.start + 1, 0), 0),
        tunnel::build(src, dst, msg(Kind::Birthday, 0, 0), 0),
    ];
    let mut echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
    echo.extend((0u8..56).collect::<Vec<_>>());
    out.push(ipv4(src, dst, 1, 5, 0x40, &echo));
    out.push(ipv4(
        src,
        dst,
        17,
        5,
        0,
        &[0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, 1, 2, 3, 4],
    ));
    let syn = [
        0xc3, 0x50, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    out.push(ipv4(src, dst, 6, 5, 0x40, &syn));
    out.push(ipv4(src, dst, 17, 5, 0x20, &[0xab; 1400]));
    out.push(ipv4(src, dst, 1, 15, 0, &echo));
    let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    v6.extend([0u8; 32]);
    v6.extend([0x30, 0x39, 0, 0x35, 0, 8, 0, 0]);
    out.push(v6);
    out
}

const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// Source of the ICMP messages the node writes to its TUN device.
const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

pub(super) fn ip_packet() -> Decoder {
    Decoder::new("ip_packet", inner_packets(A, B), 1600, |b| {
        let addrs = packet::ipv4_addrs(b);
        check(
            packet::ip_version(b) == b.first().map(|x| x >> 4),
            "ip_version is the first nibble",
        );
        if let Some((src, dst)) = addrs {
            check(
                b.len() >= 20 && b[0] >> 4 == 4 && usize::from(b[0] & 0x0f) * 4 <= b.len(),
                "only a whole IPv4 header has addresses",
            );
            check(
                src.octets() == b[12..16] && dst.octets() == b[16..20],
                "the addresses are where the header has them",
            );
        }
        let df = pmtu::dont_fragment(b);
        match pmtu::frag_needed(b, 1280, ME) {
            Some(icmp) => {
                let (src, _) = addrs.unwrap_or((Ipv4Addr::UNSPECIFIED, ME));
                check(addrs.is_some(), "ICMP only for an IPv4 packet");
                check(
                    packet::ipv4_addrs(&icmp) == Some((ME, src)),
                    "the ICMP goes from this node back to the packet's source",
                );
                let ihl = usize::from(b[0] & 0x0f) * 4;
                check(
                    icmp.len() == 28 + b.len().min(ihl + 8),
                    "the ICMP quotes the header and 8 bytes",
                );
                check(
                    icmp[20..22] == [3, 4] && icmp[26..28] == 1280u16.to_be_bytes(),
                    "type 3 code 4 with the MTU",
                );
            }
            None => check(addrs.is_none(), "every IPv4 packet can be answered"),
        }
        Outcome::with(
            if addrs.is_some() { "ipv4" } else { "not ipv4" },
            if df { "df" } else { "" },
        )
    })
}

/// `mesh_proto::tunnel::parse` (which `mesh_core::pmtu` re-exports): in-tunnel messages.
pub(super) fn pmtu() -> Decoder {
    Decoder::new("pmtu", inner_packets(A, B), 1600, |b| {
        let Some(m) = tunnel::parse(b) else {
            return Outcome::new("other");
        };
        check(
            b[0] == 0x45 && b[9] == tunnel::PROTO,
            "only in-tunnel messages parse",
        );
        let built = tunnel::build(A, B, m, b.len());
        check(
            tunnel::parse(&built) == Some(m),
            "a parsed message builds back to itself",
        );
        let mut buf = vec![0xee; built.len() + 1];
        check(
            tunnel::build_into(A, B, m, b.len(), &mut buf).map(|n| &buf[..n]) == Some(&built[..]),
            "build_into writes what build returns",
        );
        Outcome::new(match m.kind {
            Kind::Probe => "probe",
            Kind::Ack => "ack",
            Kind::Birthday => "birthday",
            Kind::Punch => "punch",
            Kind::PunchAck => "punch_ack",
        })
    })
}
