//! Telling apart the protocols that share a node's one UDP socket.
//!
//! - WireGuard messages start with a type byte 1..=4 followed by three zero bytes.
//! - QUIC packets always have the "fixed bit" 0x40 set in their first byte, because every mesh
//!   endpoint disables QUIC bit greasing (RFC 9287) so the peer never clears it.
//! - STUN messages have the two top bits clear and the magic cookie 0x2112A442 at offset 4.
//!
//! The three sets are disjoint: WireGuard's first byte is < 0x40 and its bytes 1..4 are zero,
//! so its cookie position can never hold the STUN cookie either.

/// What a datagram is, judged from its first bytes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A WireGuard message (handshake initiation/response, cookie reply, transport data).
    WireGuard,
    /// A QUIC packet (control connection, later relay connection).
    Quic,
    /// A STUN message (endpoint discovery).
    Stun,
    /// Anything else: to be dropped and counted.
    Unknown,
}

/// STUN magic cookie (RFC 5389).
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Classifies one UDP datagram by its first bytes.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    let Some(&first) = datagram.first() else {
        return DatagramKind::Unknown;
    };
    if datagram.len() >= 4 && (1..=4).contains(&first) && datagram[1..4] == [0, 0, 0] {
        return DatagramKind::WireGuard;
    }
    if first & 0x40 != 0 {
        return DatagramKind::Quic;
    }
    if first & 0xC0 == 0 && datagram.len() >= 20 && datagram[4..8] == STUN_MAGIC_COOKIE {
        return DatagramKind::Stun;
    }
    DatagramKind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_types() {
        for t in 1..=4u8 {
            assert_eq!(classify(&[t, 0, 0, 0, 9, 9]), DatagramKind::WireGuard);
        }
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[1, 0, 0, 1]), DatagramKind::Unknown);
        assert_eq!(classify(&[1, 0, 0]), DatagramKind::Unknown);
    }

    #[test]
    fn quic_long_and_short_headers() {
        assert_eq!(classify(&[0xC0, 0, 0, 0, 1]), DatagramKind::Quic);
        assert_eq!(classify(&[0x40, 1, 2]), DatagramKind::Quic);
    }

    #[test]
    fn stun_binding_request() {
        let mut m = vec![0x00, 0x01, 0x00, 0x00];
        m.extend_from_slice(&STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[0u8; 12]);
        assert_eq!(classify(&m), DatagramKind::Stun);
    }

    #[test]
    fn empty_and_garbage() {
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[0x00]), DatagramKind::Unknown);
        assert_eq!(classify(&[0x20, 0xff]), DatagramKind::Unknown);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = classify(&bytes);
        }
    }
}
