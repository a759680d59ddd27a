//! What each connected node should be told when the peer list changes (pure functions).
//!
//! **Candidates.** Peers probe every endpoint they are given, and birthday punching sprays the
//! IP of a public one, so the controller must not let a member aim the network at a third
//! party. It hands out, for a peer P:
//! - P's observed address (where P's control connection comes from), first;
//! - P's reported candidates with the observed IP (other ports of the same public address,
//!   such as the mappings standalone relays observed);
//! - P's reported global IPv6 candidates (inside 2000::/3), at most [`MAX_GLOBAL_V6`]: IPv6
//!   hosts are reached at their own addresses, which no observation over IPv4 can confirm. A
//!   member could name a third party's address here; what that costs the third party is a few
//!   handshake-sized probes per peer, backing off to one every 32 s, from a member the
//!   administrator admitted and can remove;
//! - P's other reported candidates (LAN addresses, IPv6 ULAs) only to viewers whose own
//!   observed IP equals P's: nodes behind the same NAT, for which the LAN path is the direct
//!   one.
//!
//! Reported candidates in the network's overlay range, loopback, unspecified, multicast or
//! broadcast addresses, and port 0 are refused when reported ([`filter_reported`]).

use mesh_proto::control::{PeerInfo, ServerMsg, MAX_ENDPOINTS};
use mesh_proto::PublicKey;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// Most reported global IPv6 candidates of one peer handed to every viewer (a host has one or
/// two stable addresses per uplink).
pub const MAX_GLOBAL_V6: usize = 4;

/// Whether `ip` is a global unicast IPv6 address (2000::/3), reached the same way from anywhere.
pub fn is_global_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xe000 == 0x2000)
}

/// A peer list keyed by node key.
pub type PeerMap = BTreeMap<PublicKey, PeerInfo>;

/// Whether a reported candidate may be handed to peers at all. `overlay` is the network's
/// range as (network address, prefix length).
pub fn acceptable_candidate(addr: &SocketAddr, overlay: (Ipv4Addr, u8)) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        IpAddr::V4(ip) => {
            let (net, len) = overlay;
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            let in_overlay = len > 0 && (u32::from(ip) & mask) == (u32::from(net) & mask);
            !(in_overlay
                || ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_broadcast())
        }
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return acceptable_candidate(&SocketAddr::from((v4, addr.port())), overlay);
            }
            let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
            !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local)
        }
    }
}

/// The observed address of a node's connection as a candidate, unless it lies in the overlay
/// range (the node's control traffic went through the tunnel itself), is unspecified, or has
/// port 0. A loopback address stays: it is a real observation (everything on one host).
pub fn usable_observed(observed: SocketAddr, overlay: (Ipv4Addr, u8)) -> Option<SocketAddr> {
    let loopback = observed.ip().is_loopback()
        || matches!(observed.ip(), IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
    (loopback || acceptable_candidate(&observed, overlay)).then_some(observed)
}

/// The reported candidates that may be stored: acceptable ones, without duplicates of the
/// observed address, at most `MAX_ENDPOINTS - 1`. Returns them and how many were refused.
pub fn filter_reported(
    reported: &[SocketAddr],
    observed: Option<SocketAddr>,
    overlay: (Ipv4Addr, u8),
) -> (Vec<SocketAddr>, usize) {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut refused = 0;
    for e in reported {
        if !acceptable_candidate(e, overlay) {
            refused += 1;
        } else if Some(*e) != observed && !out.contains(e) && out.len() < MAX_ENDPOINTS - 1 {
            out.push(*e);
        }
    }
    (out, refused)
}

/// The endpoints of `peer` that a viewer whose connection comes from `viewer_observed` may
/// probe (the rule in the module docs), observed first.
pub fn endpoints_for(peer: &PeerInfo, viewer_observed: Option<SocketAddr>) -> Vec<SocketAddr> {
    let Some(observed) = peer.observed else {
        // Never seen connected: nothing anybody saw, so nothing to probe.
        return Vec::new();
    };
    let same_nat = viewer_observed.is_some_and(|v| v.ip() == observed.ip());
    let mut out = vec![observed];
    let mut global_v6 = usize::from(is_global_v6(observed.ip()));
    for e in &peer.endpoints {
        if out.len() >= MAX_ENDPOINTS {
            break;
        }
        let v6 = is_global_v6(e.ip()) && global_v6 < MAX_GLOBAL_V6;
        if !out.contains(e) && (e.ip() == observed.ip() || same_nat || v6) {
            global_v6 += usize::from(is_global_v6(e.ip()));
            out.push(*e);
        }
    }
    out
}

/// The list a node sees: every member except itself, each with the endpoints this node may
/// probe. `all` holds reported endpoints and observed addresses as stored.
#[cfg(test)]
pub fn view_for(all: &[PeerInfo], me: &PublicKey) -> PeerMap {
    let my_observed = all.iter().find(|p| p.key == *me).and_then(|p| p.observed);
    view_of(all.iter(), me, my_observed)
}

/// The list a node sees (every member except itself, each with the endpoints it may probe),
/// from the members by key.
pub fn view_for_map(all: &PeerMap, me: &PublicKey) -> PeerMap {
    let my_observed = all.get(me).and_then(|p| p.observed);
    view_of(all.values(), me, my_observed)
}

fn view_of<'a>(
    all: impl Iterator<Item = &'a PeerInfo>,
    me: &PublicKey,
    my_observed: Option<SocketAddr>,
) -> PeerMap {
    all.filter(|p| p.key != *me)
        .map(|p| (p.key, seen_by(p, my_observed)))
        .collect()
}

/// `peer` as a viewer whose connection comes from `viewer_observed` is told of it.
fn seen_by(peer: &PeerInfo, viewer_observed: Option<SocketAddr>) -> PeerInfo {
    let mut seen = peer.clone();
    seen.endpoints = endpoints_for(peer, viewer_observed);
    seen
}

/// The keys whose rows differ between `old` and `new`: added, changed or gone.
pub fn changed_keys(old: &PeerMap, new: &PeerMap) -> Vec<PublicKey> {
    let mut keys: Vec<PublicKey> = new
        .iter()
        .filter(|(k, p)| old.get(k) != Some(p))
        .map(|(k, _)| *k)
        .collect();
    keys.extend(old.keys().filter(|k| !new.contains_key(k)));
    keys
}

/// The changes from the view `old` to the view `new`, by key (`None`: gone).
#[cfg(test)]
pub fn view_diff(old: &PeerMap, new: &PeerMap) -> Vec<(PublicKey, Option<PeerInfo>)> {
    let mut changes: Vec<(PublicKey, Option<PeerInfo>)> = new
        .iter()
        .filter(|(k, p)| old.get(k) != Some(p))
        .map(|(k, p)| (*k, Some(p.clone())))
        .collect();
    changes.extend(
        old.keys()
            .filter(|k| !new.contains_key(k))
            .map(|k| (*k, None)),
    );
    changes.sort_by_key(|(k, _)| *k);
    changes
}

/// What `me`, connected from `observed`, is told of the members `rows` when it connects: how
/// many peers, and each as it sees them, in key order. Lazy, so that a welcome goes out in
/// parts without a copy of the whole list per node.
pub fn welcome_view<'a>(
    rows: &'a PeerMap,
    me: &'a PublicKey,
    observed: Option<SocketAddr>,
) -> (usize, impl Iterator<Item = PeerInfo> + 'a) {
    let count = rows.len() - usize::from(rows.contains_key(me));
    let peers = rows
        .values()
        .filter(move |p| p.key != *me)
        .map(move |p| seen_by(p, observed));
    (count, peers)
}

/// The members whose candidates a viewer is told differ between its observed addresses
/// `from` and `to`.
pub fn seen_differently(
    rows: &PeerMap,
    from: Option<SocketAddr>,
    to: Option<SocketAddr>,
) -> impl Iterator<Item = PublicKey> + '_ {
    rows.values()
        .filter(move |p| endpoints_for(p, from) != endpoints_for(p, to))
        .map(|p| p.key)
}

/// One network's member rows as last read, and the order of their latest changes. A node
/// that lags behind is a position in that order (it was told every change up to it), not a
/// copy of what it was not yet told: at 5,000 nodes joining at once, copies per lagging node
/// held gigabytes.
#[derive(Debug, Default)]
pub struct Rows {
    rows: Arc<PeerMap>,
    /// Each key at the position of its latest change: members, and keys gone from `rows`
    /// until [`Rows::prune`] forgets them.
    order: BTreeMap<u64, PublicKey>,
    changed_at: HashMap<PublicKey, u64>,
    last: u64,
}

impl Rows {
    /// The rows as last read.
    pub fn rows(&self) -> &PeerMap {
        &self.rows
    }

    /// The rows as last read, to welcome a node from while they change: the node is then told
    /// the changes after [`Rows::last`].
    pub fn snapshot(&self) -> Arc<PeerMap> {
        self.rows.clone()
    }

    /// The position of the latest change (0: none yet).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Takes the rows as read now, moving each key whose row changed (added, changed or
    /// gone) to the end of the order; returns the rows before.
    pub fn update(&mut self, new: PeerMap) -> Arc<PeerMap> {
        for k in changed_keys(&self.rows, &new) {
            self.last += 1;
            if let Some(before) = self.changed_at.insert(k, self.last) {
                self.order.remove(&before);
            }
            self.order.insert(self.last, k);
        }
        std::mem::replace(&mut self.rows, Arc::new(new))
    }

    /// The keys whose latest change came after position `after`, oldest first, with their
    /// positions.
    pub fn changed_after(&self, after: u64) -> impl Iterator<Item = (u64, &PublicKey)> {
        self.order
            .range(after.saturating_add(1)..)
            .map(|(at, k)| (*at, k))
    }

    /// The `PeersChanged` that tells `me` of the peers `keys` as the rows hold them now
    /// (members upserted, others removed; `me` itself skipped); `None` when that is nothing.
    pub fn delta(
        &self,
        keys: impl IntoIterator<Item = PublicKey>,
        me: &PublicKey,
    ) -> Option<ServerMsg> {
        let observed = self.rows.get(me).and_then(|p| p.observed);
        let (mut upsert, mut remove) = (Vec::new(), Vec::new());
        for k in keys.into_iter().filter(|k| k != me) {
            match self.rows.get(&k) {
                Some(p) => upsert.push(seen_by(p, observed)),
                None => remove.push(k),
            }
        }
        (!upsert.is_empty() || !remove.is_empty())
            .then_some(ServerMsg::PeersChanged { upsert, remove })
    }

    /// Forgets the keys gone from the rows whose removal came at or before `upto` (every node
    /// was told of them).
    pub fn prune(&mut self, upto: u64) {
        if self.order.len() == self.rows.len() {
            return;
        }
        let gone: Vec<(u64, PublicKey)> = self
            .order
            .range(..=upto)
            .filter(|(_, k)| !self.rows.contains_key(*k))
            .map(|(at, k)| (*at, *k))
            .collect();
        for (at, k) in gone {
            self.order.remove(&at);
            self.changed_at.remove(&k);
        }
    }

    /// Keys remembered (members and removals not yet pruned).
    pub fn remembered(&self) -> usize {
        self.order.len()
    }
}

/// The `PeersChanged` message of `changes` (latest per key, `None`: remove).
#[cfg(test)]
pub fn delta_of<'a>(
    changes: impl IntoIterator<Item = (&'a PublicKey, &'a Option<PeerInfo>)>,
) -> ServerMsg {
    let mut upsert = Vec::new();
    let mut remove = Vec::new();
    for (k, p) in changes {
        match p {
            Some(p) => upsert.push(p.clone()),
            None => remove.push(*k),
        }
    }
    ServerMsg::PeersChanged { upsert, remove }
}

/// What a node holds after `delta` (a `PeersChanged`; other messages change nothing).
pub fn apply(view: &mut PeerMap, delta: &ServerMsg) {
    if let ServerMsg::PeersChanged { upsert, remove } = delta {
        for p in upsert {
            view.insert(p.key, p.clone());
        }
        for k in remove {
            view.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn rows_keep_each_key_once_at_its_latest_change_until_pruned() {
        let mut rows = Rows::default();
        let all: PeerMap = (1..=3).map(|n| (PublicKey([n; 32]), p(n, 51820))).collect();
        assert!(rows.update(all.clone()).is_empty());
        assert_eq!(rows.last(), 3);
        // Peer 1 moves, peer 2 leaves.
        let mut next = all.clone();
        next.insert(PublicKey([1; 32]), p(1, 40000));
        next.remove(&PublicKey([2; 32]));
        assert_eq!(*rows.update(next.clone()), all);
        let after3: Vec<(u64, PublicKey)> = rows.changed_after(3).map(|(a, k)| (a, *k)).collect();
        assert_eq!(after3.len(), 2);
        assert_eq!(
            after3.iter().map(|(_, k)| k.0[0]).collect::<Vec<_>>(),
            [1, 2]
        );
        // Peer 3 did not change since 3: a node told up to 3 is owed 1 and 2 only, each once.
        assert_eq!(rows.changed_after(0).count(), 3);
        // Nothing changed: nothing moves.
        rows.update(next.clone());
        assert_eq!(rows.last(), 5);
        // Seen by peer 3, peer 2 is gone and peer 1 is at its new port.
        let me = PublicKey([3; 32]);
        let Some(ServerMsg::PeersChanged { upsert, remove }) =
            rows.delta([1, 2].map(|n| PublicKey([n; 32])), &me)
        else {
            panic!("peer 3 is owed a change")
        };
        assert_eq!(remove, [PublicKey([2; 32])]);
        let observed: Vec<_> = upsert.iter().map(|p| (p.key, p.observed)).collect();
        assert_eq!(
            observed,
            [(PublicKey([1; 32]), Some(sa("192.0.2.1:40000")))]
        );
        // Nothing is told of a node to itself.
        assert_eq!(rows.delta([me], &me), None);
        // The removal stays until every node was told of it.
        rows.prune(4);
        assert_eq!(rows.remembered(), 3);
        rows.prune(5);
        assert_eq!(rows.remembered(), 2);
        assert_eq!(rows.changed_after(3).count(), 1);
    }

    #[test]
    fn a_large_welcome_comes_in_parts_that_add_up_to_the_list() {
        let all: Vec<PeerInfo> = (1..=7).map(|n| p(n, 51820)).collect();
        let mut rows: PeerMap = all.iter().map(|p| (p.key, p.clone())).collect();
        let me = PublicKey([9; 32]);
        rows.insert(me, p(9, 51820));
        let (count, mut peers) = welcome_view(&rows, &me, None);
        assert_eq!(count, 7);
        let first: Vec<PeerInfo> = peers.by_ref().take(3).collect();
        assert_eq!(first, all[..3]);
        let rest: Vec<ServerMsg> = std::iter::from_fn(|| {
            let upsert: Vec<PeerInfo> = peers.by_ref().take(2).collect();
            (!upsert.is_empty()).then(|| ServerMsg::PeersChanged {
                upsert,
                remove: Vec::new(),
            })
        })
        .collect();
        assert_eq!(rest.len(), 2);
        let mut w = mesh_proto::control::Welcome {
            network: "prod".into(),
            name: "n0".into(),
            address: std::net::Ipv4Addr::new(100, 64, 0, 100),
            prefix_len: 16,
            address6: None,
            prefix6: None,
            peers: first,
            relays: vec![],
            observed: None,
            observer: None,
            birthday_budget: None,
            controllers: vec![],
            now: None,
            more_peers: 4,
        };
        for (i, m) in rest.into_iter().enumerate() {
            // As the node reads them: encoded, decoded, then folded in.
            let m = mesh_proto::control::decode_server(&m.encode()).expect("valid");
            assert_eq!(w.take_rest(m), Ok(i == 1));
        }
        assert_eq!(w.peers, all);
    }

    fn p(n: u8, port: u16) -> PeerInfo {
        PeerInfo {
            key: PublicKey([n; 32]),
            name: format!("n{n}"),
            address: Ipv4Addr::new(100, 64, 0, n),
            address6: None,
            endpoints: vec![([192, 0, 2, n], port).into()],
            relay: None,
            observed: Some(([192, 0, 2, n], port).into()),
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const OVERLAY: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

    /// The changes the hub sends from the changed rows, and from the rows a viewer sees
    /// differently after its own observed address moved, bring every viewer from its old view
    /// to its new one. (A row that changed only in what a viewer does not see is sent anyway:
    /// the hub keeps no view per viewer to compare with.)
    #[test]
    fn the_changes_of_the_changed_rows_bring_each_view_up_to_date() {
        let map = |ps: Vec<PeerInfo>| -> PeerMap { ps.into_iter().map(|p| (p.key, p)).collect() };
        // 1..=6; 5 and 6 behind one NAT with LAN candidates (each sees the other's).
        let lan = |n: u8, lan_port: u16| PeerInfo {
            observed: Some(([203, 0, 113, 1], 40_000 + u16::from(n)).into()),
            endpoints: vec![([10, 0, 0, n], lan_port).into()],
            ..p(n, 1)
        };
        let old = map(vec![
            p(1, 1),
            p(2, 1),
            p(3, 1),
            p(4, 1),
            lan(5, 7),
            lan(6, 7),
            p(8, 1),
        ]);
        // 2 moves, 3 leaves, 7 joins, 6 gets a new LAN port, 8 moves behind 5's NAT (and
        // now sees 5's LAN candidate); 1, 4 and 5 stay.
        let new = map(vec![
            p(1, 1),
            p(2, 9),
            p(4, 1),
            lan(5, 7),
            lan(6, 8),
            p(7, 1),
            lan(8, 7),
        ]);
        let mut rows = Rows::default();
        rows.update(old.clone());
        let told_upto = rows.last();
        rows.update(new.clone());
        assert_eq!(rows.changed_after(told_upto).count(), 5);
        // What the hub tells a viewer told up to `told_upto`: the rows changed since, and the
        // peers it sees differently from its new observed address; each as the rows hold it.
        let tell = |viewer: u8| -> ServerMsg {
            let me = PublicKey([viewer; 32]);
            let from = old.get(&me).and_then(|p| p.observed);
            let to = new.get(&me).and_then(|p| p.observed);
            let mut keys: Vec<PublicKey> = rows.changed_after(told_upto).map(|(_, k)| *k).collect();
            keys.extend(seen_differently(rows.rows(), from, to));
            keys.sort();
            keys.dedup();
            rows.delta(keys, &me).expect("every viewer has changes")
        };
        for viewer in [1u8, 4, 5, 6, 8] {
            let me = PublicKey([viewer; 32]);
            let mut view = view_for_map(&old, &me);
            apply(&mut view, &tell(viewer));
            assert_eq!(view, view_for_map(&new, &me), "viewer {viewer}");
        }
        // 8 moved behind 5's NAT: it now sees 5's LAN candidate, though 5's row is the same.
        let upserted = |viewer: u8| -> Vec<u8> {
            match tell(viewer) {
                ServerMsg::PeersChanged { upsert, .. } => {
                    upsert.iter().map(|p| p.key.0[0]).collect()
                }
                _ => unreachable!(),
            }
        };
        assert_eq!(upserted(8), [2, 5, 6, 7]);
        assert_eq!(upserted(1), [2, 6, 7, 8]);
    }

    #[test]
    fn refuses_candidates_that_cannot_be_a_peer_endpoint() {
        for bad in [
            "100.64.0.7:51820",    // inside the overlay
            "100.127.255.1:51820", // still inside 100.64/10
            "127.0.0.1:51820",
            "0.0.0.0:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "192.0.2.1:0",
            "[::1]:51820",
            "[::]:51820",
            "[ff02::1]:51820",
            "[fe80::1]:51820",
            "[::ffff:127.0.0.1]:51820",
        ] {
            assert!(!acceptable_candidate(&sa(bad), OVERLAY), "{bad}");
        }
        for good in [
            "192.0.2.1:51820",
            "198.51.100.4:1",
            "100.128.0.1:5",
            "[2001:db8::1]:51820",
        ] {
            assert!(acceptable_candidate(&sa(good), OVERLAY), "{good}");
        }
        let observed = Some(sa("203.0.113.5:40000"));
        let (kept, refused) = filter_reported(
            &[
                sa("100.64.0.9:51820"),
                sa("203.0.113.5:40000"),
                sa("198.51.100.4:51820"),
                sa("198.51.100.4:51820"),
                sa("127.0.0.1:1"),
            ],
            observed,
            OVERLAY,
        );
        assert_eq!(kept, vec![sa("198.51.100.4:51820")]);
        assert_eq!(refused, 2);
    }

    #[test]
    fn global_ipv6_candidates_reach_every_viewer_and_ulas_only_the_same_nat() {
        let mut peer = p(2, 40000);
        peer.observed = Some(sa("203.0.113.5:40000"));
        peer.endpoints = vec![
            sa("[fd00:1::5]:40000"),
            sa("[2001:db8:1::5]:40000"),
            sa("[2001:db8:1::6]:40000"),
            sa("[2001:db8:1::7]:40000"),
            sa("[2001:db8:1::8]:40000"),
            sa("[2001:db8:1::9]:40000"),
        ];
        let elsewhere = endpoints_for(&peer, Some(sa("192.0.2.9:51820")));
        assert_eq!(elsewhere[0], sa("203.0.113.5:40000"), "observed first");
        assert_eq!(
            elsewhere[1..],
            [
                sa("[2001:db8:1::5]:40000"),
                sa("[2001:db8:1::6]:40000"),
                sa("[2001:db8:1::7]:40000"),
                sa("[2001:db8:1::8]:40000"),
            ],
            "global IPv6 addresses, at most MAX_GLOBAL_V6, no ULA"
        );
        let same_nat = endpoints_for(&peer, Some(sa("203.0.113.5:1")));
        assert!(same_nat.contains(&sa("[fd00:1::5]:40000")));
        // A node that reached the controller over IPv6 counts its observation among them.
        peer.observed = Some(sa("[2001:db8:1::5]:40000"));
        assert_eq!(
            endpoints_for(&peer, Some(sa("192.0.2.9:51820"))).len(),
            MAX_GLOBAL_V6
        );
    }

    #[test]
    fn observed_addresses_in_the_overlay_are_not_candidates() {
        assert_eq!(usable_observed(sa("100.64.0.3:51820"), OVERLAY), None);
        assert_eq!(usable_observed(sa("0.0.0.0:1"), OVERLAY), None);
        for ok in ["127.0.0.1:4000", "203.0.113.5:40000"] {
            assert_eq!(usable_observed(sa(ok), OVERLAY), Some(sa(ok)));
        }
    }

    #[test]
    fn lan_candidates_only_to_viewers_behind_the_same_public_address() {
        let mut peer = p(2, 40000);
        peer.observed = Some(sa("203.0.113.5:40000"));
        // Another port of the observed IP (a relay's observation) and a LAN address.
        peer.endpoints = vec![sa("203.0.113.5:40001"), sa("198.51.100.4:51820")];
        // A viewer elsewhere: public candidates only, observed first.
        assert_eq!(
            endpoints_for(&peer, Some(sa("192.0.2.9:51820"))),
            vec![sa("203.0.113.5:40000"), sa("203.0.113.5:40001")]
        );
        // A viewer behind the same NAT also gets the LAN address.
        assert_eq!(
            endpoints_for(&peer, Some(sa("203.0.113.5:12345"))),
            vec![
                sa("203.0.113.5:40000"),
                sa("203.0.113.5:40001"),
                sa("198.51.100.4:51820")
            ]
        );
        // A viewer whose address is unknown gets nothing private.
        assert_eq!(endpoints_for(&peer, None).len(), 2);
        // A member cannot aim the network at a third party: a reported address with another
        // IP than its own public one reaches nobody outside its NAT.
        let mut liar = p(3, 1);
        liar.observed = Some(sa("203.0.113.77:5000"));
        liar.endpoints = vec![sa("192.0.2.200:443")];
        let all = [p(1, 1), liar.clone()];
        let view = view_for(&all, &PublicKey([1; 32]));
        assert_eq!(view[&liar.key].endpoints, vec![sa("203.0.113.77:5000")]);
        // A peer never observed offers nothing to probe.
        let mut unseen = p(4, 1);
        unseen.observed = None;
        unseen.endpoints = vec![sa("192.0.2.44:51820")];
        assert!(endpoints_for(&unseen, Some(sa("192.0.2.44:1"))).is_empty());
    }

    #[test]
    fn delta_has_joins_changes_and_leaves() {
        let me = PublicKey([1; 32]);
        let old = view_for(&[p(1, 1), p(2, 1), p(3, 1)], &me);
        assert_eq!(old.len(), 2, "a node is not its own peer");
        let new = view_for(&[p(1, 1), p(3, 2), p(4, 1)], &me);
        let diff = |old: &PeerMap, new: &PeerMap| {
            let changes = view_diff(old, new);
            (!changes.is_empty()).then(|| delta_of(changes.iter().map(|(k, p)| (k, p))))
        };
        match diff(&old, &new) {
            Some(ServerMsg::PeersChanged { upsert, remove }) => {
                assert_eq!(upsert, vec![p(3, 2), p(4, 1)]);
                assert_eq!(remove, vec![PublicKey([2; 32])]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(diff(&new, &new), None);
    }
}
