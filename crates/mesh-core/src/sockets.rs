//! The node's UDP sockets as the core knows them: their ids and who owns each extra one.
//!
//! [`SocketId::MAIN`] is the node's one long-lived socket (WireGuard, QUIC, discovery). Every
//! other id is an extra socket the node asked the driver for with
//! [`crate::Event::OpenSocket`]: the sockets of a birthday attempt ([`crate::birthday`]), and
//! the one a peer keeps when such a socket won its direct path. `Sockets` says which peer each
//! belongs to, so a datagram on a peer's socket from anyone else is refused.

use mesh_proto::PublicKey;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

/// One of the node's UDP sockets, as the driver knows it: [`SocketId::MAIN`] is the node's one
/// long-lived socket (WireGuard, QUIC, discovery); any other id is an extra socket the node asked
/// for with [`crate::Event::OpenSocket`] (birthday hole punching, see [`crate::birthday`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u16);

impl SocketId {
    /// The node's main socket.
    pub const MAIN: SocketId = SocketId(0);
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == SocketId::MAIN {
            f.write_str("main")
        } else {
            write!(f, "extra-{}", self.0)
        }
    }
}

/// Who an extra socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// One of the sockets of the attempt toward this peer.
    Attempt(PublicKey),
    /// The socket of this peer's direct path (it won an attempt).
    Peer(PublicKey),
}

impl Owner {
    /// The peer the socket is for.
    pub(crate) fn peer(self) -> PublicKey {
        match self {
            Owner::Attempt(k) | Owner::Peer(k) => k,
        }
    }
}

/// The node's open extra sockets. Ids go round 1..=65535, skipping open ones, so an id is not
/// used again until all the others were.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    owners: BTreeMap<SocketId, Owner>,
    last: u16,
}

impl Sockets {
    /// Allocates an id for a new socket; `None` when every id is in use.
    pub(crate) fn open(&mut self, owner: Owner) -> Option<SocketId> {
        if self.owners.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last = self.last.checked_add(1).unwrap_or(1);
            if let Entry::Vacant(slot) = self.owners.entry(SocketId(self.last)) {
                let id = *slot.key();
                slot.insert(owner);
                return Some(id);
            }
        }
    }

    /// Forgets a socket; whether it was open.
    pub(crate) fn close(&mut self, id: SocketId) -> bool {
        self.owners.remove(&id).is_some()
    }

    pub(crate) fn owner(&self, id: SocketId) -> Option<Owner> {
        self.owners.get(&id).copied()
    }

    pub(crate) fn set_owner(&mut self, id: SocketId, owner: Owner) {
        if let Some(o) = self.owners.get_mut(&id) {
            *o = owner;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.owners.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_skip_main_and_open_ones() {
        let mut s = Sockets::default();
        let k = PublicKey([1; 32]);
        let a = s.open(Owner::Attempt(k)).unwrap();
        assert_eq!(a, SocketId(1));
        s.last = u16::MAX - 1;
        assert_eq!(s.open(Owner::Attempt(k)), Some(SocketId(u16::MAX)));
        // Wraps past MAIN (0) and past the open id 1.
        assert_eq!(s.open(Owner::Attempt(k)), Some(SocketId(2)));
        assert!(s.close(a));
        assert!(!s.close(a));
        assert_eq!(s.len(), 2);
    }
}
