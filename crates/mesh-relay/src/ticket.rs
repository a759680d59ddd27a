//! Relay tickets: the controller's word, checked by a standalone relay, that a node key belongs
//! to a network until some time.
//!
//! The MAC key is derived from `X25519(controller, relay)`, computed by the controller with its
//! private key and the relay's public key, and by the relay with its private key and the
//! controller's public key. A ticket binds the network, the node key (which the relay learns
//! from the Noise handshake, so a copied ticket is useless to anybody else) and the expiry.

use mesh_proto::control::Ticket;
use mesh_proto::PublicKey;

const KEY_LABEL: &[u8] = b"mesh relay ticket key v1";
const MAC_LABEL: &[u8] = b"mesh relay ticket v1";

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The MAC does not verify: another relay, controller, node or network, or tampering.
    #[error("relay ticket does not verify (issued for another node, network or relay, or by another controller)")]
    Invalid,
    /// Past its expiry.
    #[error("relay ticket expired {0} s ago; the controller renews tickets while the node is connected to it")]
    Expired(u64),
}

/// The key shared by one controller and one relay.
#[derive(Clone)]
pub struct TicketKey {
    key: ring::hmac::Key,
}

impl TicketKey {
    /// Derives the key from our private key and the other side's public key.
    pub fn new(our_private: &[u8; 32], their_public: &PublicKey) -> TicketKey {
        let secret = x25519_dalek::StaticSecret::from(*our_private);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(their_public.0));
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes());
        let key = ring::hmac::sign(&derive, KEY_LABEL);
        TicketKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref()),
        }
    }

    fn message(network: &str, node: &PublicKey, expires: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(MAC_LABEL.len() + 1 + network.len() + 32 + 8);
        m.extend_from_slice(MAC_LABEL);
        // Names are at most 63 bytes, so one length byte frames the network unambiguously.
        m.push(network.len().min(255) as u8);
        m.extend_from_slice(network.as_bytes());
        m.extend_from_slice(&node.0);
        m.extend_from_slice(&expires.to_be_bytes());
        m
    }

    /// Makes a ticket for `node` in `network`, valid until `expires` (Unix seconds).
    pub fn issue(&self, network: &str, node: &PublicKey, expires: u64) -> Ticket {
        let tag = ring::hmac::sign(&self.key, &Self::message(network, node, expires));
        Ticket {
            network: network.to_owned(),
            expires,
            mac: mesh_proto::hex::encode(tag.as_ref()),
        }
    }

    /// Checks a ticket shown by `node` at Unix time `now`.
    pub fn verify(&self, ticket: &Ticket, node: &PublicKey, now: u64) -> Result<(), TicketError> {
        let mac = mesh_proto::hex::decode(&ticket.mac).ok_or(TicketError::Invalid)?;
        ring::hmac::verify(
            &self.key,
            &Self::message(&ticket.network, node, ticket.expires),
            &mac,
        )
        .map_err(|_| TicketError::Invalid)?;
        if ticket.expires < now {
            return Err(TicketError::Expired(now - ticket.expires));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(seed: u8) -> ([u8; 32], PublicKey) {
        let secret = [seed; 32];
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret));
        (secret, PublicKey(public.to_bytes()))
    }

    #[test]
    fn both_sides_derive_the_same_key() {
        let (controller, controller_pub) = keypair(1);
        let (relay, relay_pub) = keypair(2);
        let node = PublicKey([7; 32]);
        let t = TicketKey::new(&controller, &relay_pub).issue("prod", &node, 1000);
        let relay_side = TicketKey::new(&relay, &controller_pub);
        assert_eq!(relay_side.verify(&t, &node, 999), Ok(()));
        assert_eq!(
            relay_side.verify(&t, &node, 1010),
            Err(TicketError::Expired(10))
        );
    }

    #[test]
    fn refuses_what_it_should() {
        let (controller, controller_pub) = keypair(1);
        let (relay, relay_pub) = keypair(2);
        let (other_relay, _) = keypair(3);
        let node = PublicKey([7; 32]);
        let t = TicketKey::new(&controller, &relay_pub).issue("prod", &node, 1000);
        let ok = TicketKey::new(&relay, &controller_pub);
        // Another node showing the ticket.
        assert_eq!(
            ok.verify(&t, &PublicKey([8; 32]), 0),
            Err(TicketError::Invalid)
        );
        // A changed network or expiry.
        let mut m = t.clone();
        m.network = "other".into();
        assert_eq!(ok.verify(&m, &node, 0), Err(TicketError::Invalid));
        let mut m = t.clone();
        m.expires += 1;
        assert_eq!(ok.verify(&m, &node, 0), Err(TicketError::Invalid));
        // A relay with another key.
        let wrong = TicketKey::new(&other_relay, &controller_pub);
        assert_eq!(wrong.verify(&t, &node, 0), Err(TicketError::Invalid));
        // Garbage MAC.
        let mut m = t;
        m.mac = "zz".repeat(32);
        assert_eq!(ok.verify(&m, &node, 0), Err(TicketError::Invalid));
    }
}
