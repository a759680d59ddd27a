//! What each connected node should be told when the peer list changes (pure functions).

use mesh_proto::control::{PeerInfo, ServerMsg};
use mesh_proto::PublicKey;
use std::collections::BTreeMap;

/// A peer list keyed by node key.
pub type PeerMap = BTreeMap<PublicKey, PeerInfo>;

/// The list a node sees: every member except itself.
pub fn view_for(all: &[PeerInfo], me: &PublicKey) -> PeerMap {
    all.iter()
        .filter(|p| p.key != *me)
        .map(|p| (p.key, p.clone()))
        .collect()
}

/// The delta from `old` to `new`, or `None` when nothing changed.
pub fn diff(old: &PeerMap, new: &PeerMap) -> Option<ServerMsg> {
    let upsert: Vec<PeerInfo> = new
        .iter()
        .filter(|(k, p)| old.get(k) != Some(p))
        .map(|(_, p)| p.clone())
        .collect();
    let remove: Vec<PublicKey> = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    if upsert.is_empty() && remove.is_empty() {
        None
    } else {
        Some(ServerMsg::PeersChanged { upsert, remove })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn p(n: u8, port: u16) -> PeerInfo {
        PeerInfo {
            key: PublicKey([n; 32]),
            name: format!("n{n}"),
            address: Ipv4Addr::new(100, 64, 0, n),
            endpoints: vec![([192, 0, 2, n], port).into()],
            relay: None,
        }
    }

    #[test]
    fn delta_has_joins_changes_and_leaves() {
        let me = PublicKey([1; 32]);
        let old = view_for(&[p(1, 1), p(2, 1), p(3, 1)], &me);
        assert_eq!(old.len(), 2, "a node is not its own peer");
        let new = view_for(&[p(1, 1), p(3, 2), p(4, 1)], &me);
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
