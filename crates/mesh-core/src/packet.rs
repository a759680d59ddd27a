//! Minimal, bounds-checked views of IP packets: just what routing needs.

use std::net::Ipv4Addr;

/// Smallest IPv4 header.
pub const IPV4_MIN_HEADER: usize = 20;

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
        }
    }
}
