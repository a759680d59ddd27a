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
        }
    }
}
