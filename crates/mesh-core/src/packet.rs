//! Minimal, bounds-checked views of IP packets: just what routing needs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Smallest IPv4 header.
pub const IPV4_MIN_HEADER: usize = 20;
/// The IPv6 header (extension headers follow it; routing needs none of them).
pub const IPV6_HEADER: usize = 40;

/// Source and destination of an IPv4 packet, or `None` if the bytes are not a plausible IPv4
/// packet (wrong version, header shorter than 20 bytes, IHL beyond the buffer).
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < IPV4_MIN_HEADER || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER || ihl > packet.len() {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

/// Source and destination of an IPv6 packet, or `None` if the bytes are not a plausible IPv6
/// packet (wrong version, shorter than the 40-byte header).
pub fn ipv6_addrs(packet: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    if packet.len() < IPV6_HEADER || packet[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&packet[8..24]);
    dst.copy_from_slice(&packet[24..40]);
    Some((Ipv6Addr::from(src), Ipv6Addr::from(dst)))
}

/// The upper-layer protocol of an IPv6 packet and where its header starts, past the extension
/// headers mesh may meet (hop-by-hop options, routing, fragment, destination options). `None`
/// if the bytes are not a plausible IPv6 packet or the chain runs past them. A non-first
/// fragment carries no upper-layer header: it gives the fragment header's own number (44).
pub fn ipv6_upper_layer(packet: &[u8]) -> Option<(u8, usize)> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DESTINATION: u8 = 60;
    ipv6_addrs(packet)?;
    let mut next = *packet.get(6)?;
    let mut at = IPV6_HEADER;
    // Every extension header is at least 8 bytes and must be there whole: the walk ends.
    loop {
        let len = match next {
            HOP_BY_HOP | ROUTING | DESTINATION => (usize::from(*packet.get(at + 1)?) + 1) * 8,
            FRAGMENT => 8,
            _ => return Some((next, at)),
        };
        let header = packet.get(at..at + len)?;
        if next == FRAGMENT && u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
            return Some((FRAGMENT, at));
        }
        next = header[0];
        at += len;
    }
}

/// Source and destination of an IPv4 or IPv6 packet (see [`ipv4_addrs`], [`ipv6_addrs`]).
pub fn ip_addrs(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match ip_version(packet)? {
        4 => ipv4_addrs(packet).map(|(s, d)| (s.into(), d.into())),
        6 => ipv6_addrs(packet).map(|(s, d)| (s.into(), d.into())),
        _ => None,
    }
}

/// Whether mesh never routes an IPv6 destination: multicast and link-local (the kernel's
/// router and neighbour solicitations on a fresh interface), which stay on the link.
pub fn link_scoped_v6(dst: Ipv6Addr) -> bool {
    dst.is_multicast() || (dst.segments()[0] & 0xffc0) == 0xfe80
}

/// IP version nibble of a packet, if any bytes are present.
pub fn ip_version(packet: &[u8]) -> Option<u8> {
    packet.first().map(|b| b >> 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(
            ipv4_addrs(&p),
            Some((Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)))
        );
    }

    #[test]
    fn reads_ipv6_addresses() {
        let mut p = [0u8; 40];
        p[0] = 0x60;
        let a: Ipv6Addr = "fd12:3456:789a::1".parse().unwrap();
        let b: Ipv6Addr = "fd12:3456:789a::2".parse().unwrap();
        p[8..24].copy_from_slice(&a.octets());
        p[24..40].copy_from_slice(&b.octets());
        assert_eq!(ipv6_addrs(&p), Some((a, b)));
        assert_eq!(ip_addrs(&p), Some((a.into(), b.into())));
        assert_eq!(ipv6_addrs(&p[..39]), None);
        assert_eq!(ipv4_addrs(&p), None);
        p[0] = 0x45;
        assert_eq!(ipv6_addrs(&p), None);
        assert!(link_scoped_v6("ff02::2".parse().unwrap()));
        assert!(link_scoped_v6("fe80::1".parse().unwrap()));
        assert!(!link_scoped_v6(a));
    }

    #[test]
    fn finds_the_upper_layer_past_extension_headers() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 58;
        p.extend([128, 0, 0, 0]);
        assert_eq!(ipv6_upper_layer(&p), Some((58, 40)));
        // Hop-by-hop options (16 bytes), then a first fragment, then ICMPv6.
        p[6] = 0;
        p.truncate(40);
        p.extend([44, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        p.extend([58, 0, 0, 1, 0, 0, 0, 7]);
        p.extend([1, 0, 0, 0]);
        assert_eq!(ipv6_upper_layer(&p), Some((58, 64)));
        // A later fragment has no upper-layer header.
        p[58] = 0x05;
        p[59] = 0x69;
        assert_eq!(ipv6_upper_layer(&p), Some((44, 56)));
        // A chain that runs past the bytes, and no extension header at all.
        assert_eq!(ipv6_upper_layer(&p[..50]), None);
        p[41] = 200;
        assert_eq!(ipv6_upper_layer(&p), None);
        assert_eq!(ipv6_upper_layer(&p[..40]), None);
        p[6] = 59; // no next header, and nothing after it
        assert_eq!(ipv6_upper_layer(&p[..40]), Some((59, 40)));
        assert_eq!(ipv6_upper_layer(&[0x45; 60]), None);
    }

    #[test]
    fn refuses_non_ipv4_and_short() {
        assert_eq!(ipv4_addrs(&[0x60; 40]), None);
        assert_eq!(ipv4_addrs(&[0x45; 19]), None);
        let mut p = [0u8; 20];
        p[0] = 0x4f; // IHL 60 > 20 bytes present
        assert_eq!(ipv4_addrs(&p), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = ipv4_addrs(&bytes);
            let _ = ip_addrs(&bytes);
            let _ = ipv6_upper_layer(&bytes);
        }
    }
}
