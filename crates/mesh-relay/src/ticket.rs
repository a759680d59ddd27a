//! Relay tickets: the controller's word, checked by a standalone relay, that a node key belongs
//! to a network until some time.
//!
//! The MAC key is derived from `X25519(controller, relay)`, computed by the controller with its
//! private key and the relay's public key, and by the relay with its private key and the
//! controller's public key. A ticket binds the network, the node key (which the relay learns
//! from the Noise handshake, so a copied ticket is useless to anybody else) and the expiry.
//!
//! The same key authenticates [`Revocation`]s (under another label): when the admin removes a
//! node, the controller voids, for each relay, every ticket of that node that expires at or
//! before the latest expiry it could have issued. Nodes carry revocations to the relays, which
//! keep them in a bounded [`Revocations`] table until they expire.

use mesh_proto::control::{Revocation, Ticket};
use mesh_proto::PublicKey;
use std::collections::HashMap;

const KEY_LABEL: &[u8] = b"mesh relay ticket key v1";
const MAC_LABEL: &[u8] = b"mesh relay ticket v1";
const REVOCATION_LABEL: &[u8] = b"mesh relay revocation v1";
/// Revocations a relay keeps at most; beyond that the ones that expire first go.
pub const MAX_REVOKED: usize = 4096;

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
        Self::labelled(MAC_LABEL, network, node, expires)
    }

    fn labelled(label: &[u8], network: &str, node: &PublicKey, expires: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(label.len() + 1 + network.len() + 32 + 8);
        m.extend_from_slice(label);
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

    /// Voids the tickets of `node` in `network` that expire at or before `expires`.
    pub fn revoke(&self, network: &str, node: &PublicKey, expires: u64) -> Revocation {
        let m = Self::labelled(REVOCATION_LABEL, network, node, expires);
        Revocation {
            key: *node,
            expires,
            mac: mesh_proto::hex::encode(ring::hmac::sign(&self.key, &m).as_ref()),
        }
    }

    /// Whether `r` was made by the controller for this relay and `network`.
    pub fn verify_revocation(&self, network: &str, r: &Revocation) -> bool {
        let Some(mac) = mesh_proto::hex::decode(&r.mac) else {
            return false;
        };
        let m = Self::labelled(REVOCATION_LABEL, network, &r.key, r.expires);
        ring::hmac::verify(&self.key, &m, &mac).is_ok()
    }
}

/// Verified revocations a relay holds: (network, node key) to the expiry up to which the node's
/// tickets are void. Bounded by [`MAX_REVOKED`]; an entry goes once its expiry has passed.
#[derive(Debug, Default)]
pub struct Revocations {
    table: HashMap<(String, PublicKey), u64>,
}

impl Revocations {
    /// Records a verified revocation; returns false when it was already known (or is over).
    pub fn insert(&mut self, network: &str, node: &PublicKey, expires: u64, now: u64) -> bool {
        if expires < now {
            return false;
        }
        let id = (network.to_owned(), *node);
        if self.table.get(&id).is_some_and(|e| *e >= expires) {
            return false;
        }
        if !self.table.contains_key(&id) && self.table.len() >= MAX_REVOKED {
            self.table.retain(|_, e| *e >= now);
            if self.table.len() >= MAX_REVOKED {
                let soonest = self
                    .table
                    .iter()
                    .min_by_key(|(_, e)| **e)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    self.table.remove(&k);
                }
            }
        }
        self.table.insert(id, expires);
        true
    }

    /// Whether a ticket of `node` in `network` that expires at `ticket_expires` is void.
    pub fn voids(&self, network: &str, node: &PublicKey, ticket_expires: u64) -> bool {
        self.table
            .get(&(network.to_owned(), *node))
            .is_some_and(|cutoff| ticket_expires <= *cutoff)
    }

    /// Revocations held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
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
    fn revocations_verify_void_old_tickets_only_and_stay_bounded() {
        let (controller, controller_pub) = keypair(1);
        let (relay, relay_pub) = keypair(2);
        let node = PublicKey([7; 32]);
        let issuer = TicketKey::new(&controller, &relay_pub);
        let r = issuer.revoke("prod", &node, 5000);
        let relay_side = TicketKey::new(&relay, &controller_pub);
        assert!(relay_side.verify_revocation("prod", &r));
        assert!(
            !relay_side.verify_revocation("dev", &r),
            "bound to the network"
        );
        let mut forged = r.clone();
        forged.expires += 1;
        assert!(!relay_side.verify_revocation("prod", &forged));
        // A ticket's MAC is not a revocation's.
        let t = issuer.issue("prod", &node, 5000);
        let as_revocation = Revocation {
            key: node,
            expires: 5000,
            mac: t.mac,
        };
        assert!(!relay_side.verify_revocation("prod", &as_revocation));

        let mut table = Revocations::default();
        assert!(table.insert("prod", &node, 5000, 100));
        assert!(!table.insert("prod", &node, 5000, 100), "known");
        assert!(table.voids("prod", &node, 5000));
        assert!(
            !table.voids("prod", &node, 5001),
            "a later ticket: joined again"
        );
        assert!(!table.voids("dev", &node, 10));
        assert!(!table.insert("prod", &PublicKey([8; 32]), 50, 100), "over");
        for n in 0..(MAX_REVOKED as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_be_bytes());
            table.insert("prod", &PublicKey(k), 10_000 + u64::from(n), 100);
        }
        assert_eq!(table.len(), MAX_REVOKED);
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
