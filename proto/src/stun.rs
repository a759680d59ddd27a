//! STUN binding requests and answers (RFC 5389), as the node and the controller's observer use
//! them: the node asks from its one UDP socket, the observer answers with the address it saw
//! (XOR-MAPPED-ADDRESS). Together with the address the controller's QUIC side sees, that is two
//! observations of one mapping from two destinations, which tell whether the node's NAT maps
//! per destination (see [`crate::control::NatKind`]).
//!
//! The wire format is `stun_codec`'s. What this module adds is the policy: a request must be at
//! least as long as its answer (the observer amplifies nothing), and decoding takes only what
//! mesh sends (a binding request, or a binding success answer carrying an address) and never
//! panics.

use bytecodec::{DecodeExt, EncodeExt};
use std::net::SocketAddr;
use stun_codec::rfc5389::attributes::{Software, XorMappedAddress};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

/// Names mesh in requests; also pads them to at least the size of an answer.
const SOFTWARE: &str = "mesh nat check, version 1";

/// Longest datagram either side accepts as a binding message.
pub const MAX_LEN: usize = 512;

/// The largest answer: header (20) and an IPv6 XOR-MAPPED-ADDRESS (4 + 20).
const MAX_ANSWER_LEN: usize = 44;

/// A binding request with transaction id `id`.
pub fn request(id: [u8; 12]) -> Vec<u8> {
    let mut m = Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(id));
    if let Ok(s) = Software::new(SOFTWARE.to_owned()) {
        m.add_attribute(s);
    }
    MessageEncoder::new()
        .encode_into_bytes(m)
        .unwrap_or_default()
}

/// The transaction id of a binding request, or `None` for anything else, including requests
/// shorter than the largest answer (answering those would amplify a spoofed source's traffic).
pub fn parse_request(datagram: &[u8]) -> Option<[u8; 12]> {
    if datagram.len() < MAX_ANSWER_LEN || datagram.len() > MAX_LEN {
        return None;
    }
    let m = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .ok()?
        .ok()?;
    (m.class() == MessageClass::Request && m.method() == BINDING)
        .then(|| *m.transaction_id().as_bytes())
}

/// The answer to request `id`: `seen` is where the request came from.
pub fn answer(id: [u8; 12], seen: SocketAddr) -> Vec<u8> {
    let mut m = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(id),
    );
    m.add_attribute(XorMappedAddress::new(seen));
    MessageEncoder::new()
        .encode_into_bytes(m)
        .unwrap_or_default()
}

/// The transaction id and the observed address of a binding success answer, or `None`.
pub fn parse_answer(datagram: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    if datagram.len() > MAX_LEN {
        return None;
    }
    let m = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .ok()?
        .ok()?;
    if m.class() != MessageClass::SuccessResponse || m.method() != BINDING {
        return None;
    }
    let seen = m.get_attribute::<XorMappedAddress>()?.address();
    Some((*m.transaction_id().as_bytes(), seen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demux::{classify, DatagramKind};
    use proptest::prelude::*;

    #[test]
    fn request_and_answer_round_trip() {
        let id = [7u8; 12];
        let req = request(id);
        assert_eq!(classify(&req), DatagramKind::Stun);
        assert_eq!(parse_request(&req), Some(id));
        let seen: SocketAddr = "203.0.113.9:40001".parse().unwrap();
        let ans = answer(id, seen);
        assert_eq!(classify(&ans), DatagramKind::Stun);
        assert_eq!(parse_answer(&ans), Some((id, seen)));
        let seen6: SocketAddr = "[2001:db8::9]:40001".parse().unwrap();
        assert_eq!(parse_answer(&answer(id, seen6)), Some((id, seen6)));
        // Neither is taken for the other.
        assert_eq!(parse_answer(&req), None);
        assert_eq!(parse_request(&ans), None);
    }

    #[test]
    fn the_observer_amplifies_nothing() {
        let req = request([1; 12]);
        let seen6: SocketAddr = "[2001:db8::9]:40001".parse().unwrap();
        assert!(answer([1; 12], seen6).len() <= MAX_ANSWER_LEN);
        assert!(req.len() >= MAX_ANSWER_LEN, "{} bytes", req.len());
        // A bare binding request (20 bytes, as other STUN clients send) gets no answer.
        let bare = MessageEncoder::new()
            .encode_into_bytes(Message::<Attribute>::new(
                MessageClass::Request,
                BINDING,
                TransactionId::new([1; 12]),
            ))
            .unwrap();
        assert_eq!(parse_request(&bare), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes);
            let _ = parse_answer(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_mangled_messages(
            flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..8),
            cut in 0usize..64,
        ) {
            let mut bytes = answer([3; 12], "192.0.2.7:9".parse().unwrap());
            bytes.extend(request([4; 12]));
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] ^= b;
            }
            bytes.truncate(cut.max(1));
            let _ = parse_request(&bytes);
            let _ = parse_answer(&bytes);
        }
    }
}
