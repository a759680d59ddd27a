//! The peer table: every peer by key, by overlay address and by WireGuard receiver index.
//!
//! The three maps always agree: a peer is in all of them or in none, no two peers share an
//! overlay address, and an index names one peer. [`PeerTable::insert`] and
//! [`PeerTable::remove`] are the only ways in and out; everything else reads or mutates peers
//! in place without touching the keys the maps hold.

use crate::peer::Peer;
use mesh_proto::PublicKey;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;

/// A multiplicative hash for the small keys of the per-packet lookups (overlay addresses and
/// our own receiver indices). SipHash cost about 150 instructions a packet; these keys come
/// from the controller and from this node, so nobody chooses them to collide.
#[derive(Default, Clone, Copy)]
pub(crate) struct SmallKeyHasher(u64);

impl Hasher for SmallKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type SmallKeyMap<K, V> = HashMap<K, V, BuildHasherDefault<SmallKeyHasher>>;

#[derive(Default)]
pub(crate) struct PeerTable {
    /// Ordered, so that timer work (and so a whole simulated run) is the same for a given seed.
    by_key: BTreeMap<PublicKey, Peer>,
    by_address: SmallKeyMap<Ipv4Addr, PublicKey>,
    by_index: SmallKeyMap<u32, PublicKey>,
    next_index: u32,
}

impl PeerTable {
    /// An empty table whose first index comes from `seed` (24 bits, never 0).
    pub(crate) fn new(seed: u32) -> PeerTable {
        PeerTable {
            next_index: (seed & 0x00ff_ffff).max(1),
            ..PeerTable::default()
        }
    }

    pub(crate) fn get(&self, key: &PublicKey) -> Option<&Peer> {
        self.by_key.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &PublicKey) -> Option<&mut Peer> {
        self.by_key.get_mut(key)
    }

    pub(crate) fn contains(&self, key: &PublicKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// The peer that owns overlay address `ip`.
    pub(crate) fn key_by_address(&self, ip: &Ipv4Addr) -> Option<PublicKey> {
        self.by_address.get(ip).copied()
    }

    /// The peer whose session uses our receiver index `index`.
    pub(crate) fn key_by_index(&self, index: u32) -> Option<PublicKey> {
        self.by_index.get(&index).copied()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.by_key.keys()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PublicKey, &Peer)> {
        self.by_key.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&PublicKey, &mut Peer)> {
        self.by_key.iter_mut()
    }

    /// A fresh receiver index for a new peer: 24 bits (boringtun keeps the low 8 for the
    /// session), never 0, never one in use.
    pub(crate) fn allocate_index(&mut self) -> u32 {
        loop {
            let i = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if self.next_index == 0 {
                self.next_index = 1;
            }
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Adds a new peer (its index from [`PeerTable::allocate_index`]). The caller has checked
    /// that its key and address are free.
    pub(crate) fn insert(&mut self, peer: Peer) {
        let key = peer.config.key;
        self.by_address.insert(peer.config.address, key);
        self.by_index.insert(peer.index, key);
        self.by_key.insert(key, peer);
    }

    /// Moves a peer to a new overlay address (the caller has checked it is free).
    pub(crate) fn readdress(&mut self, key: &PublicKey, address: Ipv4Addr) {
        let Some(peer) = self.by_key.get_mut(key) else {
            return;
        };
        if peer.config.address != address {
            self.by_address.remove(&peer.config.address);
            self.by_address.insert(address, *key);
            peer.config.address = address;
        }
    }

    /// Takes a peer out of every map.
    pub(crate) fn remove(&mut self, key: &PublicKey) -> Option<Peer> {
        let peer = self.by_key.remove(key)?;
        self.by_address.remove(&peer.config.address);
        self.by_index.remove(&peer.index);
        Some(peer)
    }
}
