//! The peer table: every peer by key, by overlay address (IPv4, and IPv6 where it has one) and
//! by WireGuard receiver index.
//!
//! The peers and the maps always agree: a peer is in all of them or in none (the IPv6 map holds
//! only peers with an IPv6 address), no two peers share an overlay address, an index names one
//! peer, and each map points at the peer's
//! current position. [`PeerTable::insert`] and
//! [`PeerTable::remove`] are the only ways in and out; everything else reads or mutates peers
//! in place without touching the keys the maps hold.

use crate::peer::Peer;
use ipnet::IpNet;
use mesh_proto::PublicKey;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// Where a peer sits in the table: valid until the next [`PeerTable::insert`] or
/// [`PeerTable::remove`] (those shift the peers after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot(usize);

/// Which peer owns which source address, as WireGuard's allowed IPs decide it: the owner of
/// an overlay address (IPv4 or IPv6), else the peer whose routed prefix is the longest that
/// contains it. A peer whose prefixes are wide (an exit's 0.0.0.0/0) still cannot send from
/// another node's address or from a more specific prefix another node routes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    addresses: SmallKeyMap<Ipv4Addr, PublicKey>,
    addresses6: SmallKeyMap<Ipv6Addr, PublicKey>,
    /// Longest prefix first, as [`PeerTable`] keeps them.
    routes: Vec<(IpNet, PublicKey)>,
}

impl Sources {
    /// Whether the peer `key` (overlay addresses `address` and `address6`) may send packets
    /// from `source`.
    pub(crate) fn may_send(
        &self,
        key: &PublicKey,
        address: Ipv4Addr,
        address6: Option<Ipv6Addr>,
        source: IpAddr,
    ) -> bool {
        let owner = match source {
            IpAddr::V4(v4) if v4 == address => return true,
            IpAddr::V6(v6) if Some(v6) == address6 => return true,
            IpAddr::V4(v4) => self.addresses.get(&v4),
            IpAddr::V6(v6) => self.addresses6.get(&v6),
        };
        if let Some(owner) = owner {
            return owner == key;
        }
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&source))
            .is_some_and(|(_, owner)| owner == key)
    }
}

#[derive(Default)]
pub(crate) struct PeerTable {
    /// Sorted by key, so that timer work (and so a whole simulated run) is the same for a given
    /// seed, and so that the per-packet lookups below lead straight to the peer. Boxed, so that a
    /// sorted insert moves pointers, not peers.
    peers: Vec<(PublicKey, Box<Peer>)>,
    by_address: SmallKeyMap<Ipv4Addr, Slot>,
    by_address6: SmallKeyMap<Ipv6Addr, Slot>,
    by_index: SmallKeyMap<u32, Slot>,
    /// Every peer's routed prefixes (see [`PeerConfig::routes`](crate::PeerConfig)), longest
    /// first, then by prefix and key: the first that contains a destination is its route.
    routes: Vec<(IpNet, PublicKey)>,
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

    fn find(&self, key: &PublicKey) -> Result<usize, usize> {
        self.peers.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub(crate) fn get(&self, key: &PublicKey) -> Option<&Peer> {
        self.find(key).ok().map(|i| &*self.peers[i].1)
    }

    pub(crate) fn get_mut(&mut self, key: &PublicKey) -> Option<&mut Peer> {
        self.find(key).ok().map(|i| &mut *self.peers[i].1)
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn contains(&self, key: &PublicKey) -> bool {
        self.find(key).is_ok()
    }

    /// The peer that owns overlay address `ip`.
    pub(crate) fn by_address(&self, ip: &Ipv4Addr) -> Option<Slot> {
        self.by_address.get(ip).copied()
    }

    /// The peer that owns IPv6 overlay address `ip`.
    pub(crate) fn by_address6(&self, ip: &Ipv6Addr) -> Option<Slot> {
        self.by_address6.get(ip).copied()
    }

    /// The peer a packet to `ip` goes to: the owner of the overlay address, else the peer whose
    /// routed prefix is the longest that contains it.
    pub(crate) fn route(&self, ip: &IpAddr) -> Option<Slot> {
        let owner = match ip {
            IpAddr::V4(v4) => self.by_address(v4),
            IpAddr::V6(v6) => self.by_address6(v6),
        };
        if owner.is_some() {
            return owner;
        }
        let (_, key) = self.routes.iter().find(|(net, _)| net.contains(ip))?;
        self.slot(key)
    }

    /// Takes the routed prefixes of the peer with `key` from its configuration again (after
    /// the configuration changed).
    pub(crate) fn reroute(&mut self, key: &PublicKey) {
        self.routes.retain(|(_, k)| k != key);
        if let Some(peer) = self.get(key) {
            let mine: Vec<_> = peer
                .config
                .routes
                .iter()
                .map(|n| (n.trunc(), *key))
                .collect();
            self.routes.extend(mine);
        }
        self.routes.sort_by(|(a, ka), (b, kb)| {
            b.prefix_len()
                .cmp(&a.prefix_len())
                .then(a.network().cmp(&b.network()))
                .then(ka.cmp(kb))
        });
    }

    /// The peer whose session uses our receiver index `index`.
    pub(crate) fn by_index(&self, index: u32) -> Option<Slot> {
        self.by_index.get(&index).copied()
    }

    /// The key of the peer that owns overlay address `ip`.
    pub(crate) fn key_by_address(&self, ip: &Ipv4Addr) -> Option<PublicKey> {
        self.by_address(ip).map(|s| self.peers[s.0].0)
    }

    /// The key of the peer that owns IPv6 overlay address `ip`.
    pub(crate) fn key_by_address6(&self, ip: &Ipv6Addr) -> Option<PublicKey> {
        self.by_address6(ip).map(|s| self.peers[s.0].0)
    }

    /// Where the peer with `key` sits.
    pub(crate) fn slot(&self, key: &PublicKey) -> Option<Slot> {
        self.find(key).ok().map(Slot)
    }

    /// The key of the peer in `slot`.
    pub(crate) fn key_at(&self, slot: Slot) -> PublicKey {
        self.peers[slot.0].0
    }

    /// The peer in `slot`, to read.
    pub(crate) fn at(&self, slot: Slot) -> &Peer {
        &self.peers[slot.0].1
    }

    /// The peer in `slot` (from [`PeerTable::by_address`] or [`PeerTable::by_index`] since
    /// the last insert or remove).
    pub(crate) fn at_mut(&mut self, slot: Slot) -> &mut Peer {
        &mut self.peers[slot.0].1
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.peers.iter().map(|(k, _)| k)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PublicKey, &Peer)> {
        self.peers.iter().map(|(k, p)| (k, &**p))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&PublicKey, &mut Peer)> {
        self.peers.iter_mut().map(|(k, p)| (&*k, &mut **p))
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
        // Not expected (the caller checked), but the maps must stay right.
        self.remove(&key);
        let Err(at) = self.find(&key) else { return };
        self.peers.insert(at, (key, Box::new(peer)));
        self.reslot(at);
        self.reroute(&key);
    }

    /// Moves a peer to new overlay addresses (the caller has checked they are free).
    pub(crate) fn readdress(
        &mut self,
        key: &PublicKey,
        address: Ipv4Addr,
        address6: Option<Ipv6Addr>,
    ) {
        let Ok(i) = self.find(key) else {
            return;
        };
        let peer = &mut self.peers[i].1;
        if peer.config.address != address {
            self.by_address.remove(&peer.config.address);
            self.by_address.insert(address, Slot(i));
            peer.config.address = address;
        }
        if peer.config.address6 != address6 {
            if let Some(old) = peer.config.address6 {
                self.by_address6.remove(&old);
            }
            if let Some(new) = address6 {
                self.by_address6.insert(new, Slot(i));
            }
            peer.config.address6 = address6;
        }
    }

    /// Who may send from which source address: a snapshot of the overlay addresses and routed
    /// prefixes, for the check on every decrypted packet (see [`Sources`]). Empty while no
    /// peer routes a prefix: then a peer may send from its own address alone.
    pub(crate) fn sources(&self) -> Sources {
        if self.routes.is_empty() {
            return Sources::default();
        }
        Sources {
            addresses: self
                .peers
                .iter()
                .map(|(k, p)| (p.config.address, *k))
                .collect(),
            addresses6: self
                .peers
                .iter()
                .filter_map(|(k, p)| Some((p.config.address6?, *k)))
                .collect(),
            routes: self.routes.clone(),
        }
    }

    /// Takes a peer out of every map.
    pub(crate) fn remove(&mut self, key: &PublicKey) -> Option<Peer> {
        let i = self.find(key).ok()?;
        let (_, peer) = self.peers.remove(i);
        self.by_address.remove(&peer.config.address);
        if let Some(a6) = peer.config.address6 {
            self.by_address6.remove(&a6);
        }
        self.by_index.remove(&peer.index);
        self.routes.retain(|(_, k)| k != key);
        self.reslot(i);
        Some(*peer)
    }

    /// Points the maps at the peers from position `from` on (they moved).
    fn reslot(&mut self, from: usize) {
        for (i, (_, peer)) in self.peers.iter().enumerate().skip(from) {
            self.by_address.insert(peer.config.address, Slot(i));
            if let Some(a6) = peer.config.address6 {
                self.by_address6.insert(a6, Slot(i));
            }
            self.by_index.insert(peer.index, Slot(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;
    use crate::PeerConfig;
    use std::time::Instant;
    use x25519_dalek::StaticSecret;

    fn peer(table: &mut PeerTable, n: u8) -> Peer {
        let config = PeerConfig {
            routes: Vec::new(),
            key: PublicKey([n; 32]),
            name: format!("p{n}"),
            address: Ipv4Addr::new(100, 64, 1, n),
            address6: Some(Ipv6Addr::new(
                0xfd12,
                0x3456,
                0x789a,
                0,
                0,
                0,
                1,
                u16::from(n),
            )),
            endpoints: vec![],
            observed: None,
            nat: None,
        };
        let index = table.allocate_index();
        let secret = StaticSecret::from([7u8; 32]);
        let session = Session::new(
            secret,
            config.key,
            None,
            index,
            crate::session::wall_clock(std::time::Instant::now()),
        );
        Peer::new(config, session, index, None, 1420, Instant::now())
    }

    /// Every peer is found by key, address and index, at the slot that holds it, and the
    /// iteration is in key order.
    fn check(table: &PeerTable, present: &[u8]) {
        let keys: Vec<u8> = table.keys().map(|k| k.0[0]).collect();
        let mut sorted = present.to_vec();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        assert_eq!(table.by_address.len(), present.len());
        assert_eq!(table.by_address6.len(), present.len());
        assert_eq!(table.by_index.len(), present.len());
        for &n in present {
            let key = PublicKey([n; 32]);
            let p = table.get(&key).expect("by key");
            let slot = table.by_address(&p.config.address).expect("by address");
            assert_eq!(table.key_at(slot), key);
            assert_eq!(
                table.by_address6(&p.config.address6.expect("an address6")),
                Some(slot)
            );
            assert_eq!(table.by_index(p.index), Some(slot));
            assert_eq!(table.slot(&key), Some(slot));
        }
    }

    #[test]
    fn maps_follow_inserts_and_removals_in_any_order() {
        let mut table = PeerTable::new(5);
        let mut present = Vec::new();
        for n in [9u8, 3, 14, 1, 7, 12, 5] {
            let p = peer(&mut table, n);
            table.insert(p);
            present.push(n);
            check(&table, &present);
        }
        for n in [3u8, 12, 9] {
            let gone = table.remove(&PublicKey([n; 32])).expect("present");
            assert_eq!(gone.config.key, PublicKey([n; 32]));
            assert!(table.by_index(gone.index).is_none());
            present.retain(|&x| x != n);
            check(&table, &present);
        }
        assert!(table.remove(&PublicKey([3; 32])).is_none());
        let new6 = Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0, 0, 2, 7);
        table.readdress(
            &PublicKey([7; 32]),
            Ipv4Addr::new(100, 64, 2, 7),
            Some(new6),
        );
        assert!(table.by_address(&Ipv4Addr::new(100, 64, 1, 7)).is_none());
        let old6 = Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0, 0, 1, 7);
        assert!(table.by_address6(&old6).is_none());
        check(&table, &present);
        // The same key again replaces the peer without leaving its old entries behind.
        let again = peer(&mut table, 7);
        table.insert(again);
        check(&table, &present);
    }
}
