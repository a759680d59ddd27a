//! Names for several nodes: `mesh-controller name set prod k8s-api cp1 cp2 cp3` makes
//! `k8s-api` (and `k8s-api.prod.mesh`) resolve, on every node, to the overlay addresses of
//! those of `cp1`, `cp2` and `cp3` that the asking node can reach. kubeadm's
//! `controlPlaneEndpoint` set to such a name survives the loss of one control-plane node
//! without a load balancer.
//!
//! One row of `names` per network and name, with its members by node name (the administrator
//! typed them; a member that leaves and joins again under its name is a member again). A name
//! is a DNS name by the rules node names follow, and never one a live node holds: the two
//! would answer differently. Nodes learn the whole list ([`Store::aliases`]) after the welcome
//! and whenever it changes.

use super::sql::{params, Conn, OptionalExtension};
use super::{network_by_name, Store, StoreError};
use mesh_proto::control::{valid_node_name, NameAlias, MAX_ALIASES, MAX_ALIAS_NODES};

impl Store {
    /// Makes `name` stand for `nodes` in `network` (replacing its members if it exists).
    /// Every member must be a live node of the network; the name must be a valid DNS name
    /// that no live node holds.
    pub fn set_name(
        &mut self,
        network: &str,
        name: &str,
        nodes: &[String],
        now: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let (network_id, _) = network_by_name(&tx, network)?;
        let name = name.trim().to_ascii_lowercase();
        if !valid_node_name(&name) {
            return Err(StoreError::Invalid(format!(
                "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', at most {} characters, each part starting and ending with a letter or digit (like `k8s-api`)",
                mesh_proto::control::MAX_NAME_LEN
            )));
        }
        if nodes.is_empty() {
            return Err(StoreError::Invalid(format!(
                "name {name:?} needs at least one node: `mesh-controller name set {network} {name} NODE...`"
            )));
        }
        if nodes.len() > MAX_ALIAS_NODES {
            return Err(StoreError::Invalid(format!(
                "a name may stand for at most {MAX_ALIAS_NODES} nodes, not {}",
                nodes.len()
            )));
        }
        if let Some(address) = live_node(&tx, network_id, &name)? {
            return Err(StoreError::Invalid(format!(
                "{name:?} is the name of node {address} in network {network:?}; a name for several nodes must differ from every node's name"
            )));
        }
        let mut members: Vec<String> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let node = node.trim().to_ascii_lowercase();
            if live_node(&tx, network_id, &node)?.is_none() {
                return Err(StoreError::Invalid(format!(
                    "no node named {node:?} in network {network:?} (see `mesh-controller node list {network}`)"
                )));
            }
            if !members.contains(&node) {
                members.push(node);
            }
        }
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM names WHERE network_id = ?1 AND name = ?2",
                params![network_id, name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            let count: i64 = tx.query_row(
                "SELECT COUNT(*) FROM names WHERE network_id = ?1",
                [network_id],
                |r| r.get(0),
            )?;
            if count >= MAX_ALIASES as i64 {
                return Err(StoreError::Invalid(format!(
                    "network {network:?} has {MAX_ALIASES} names for several nodes already, the most it may have; remove one with `mesh-controller name remove {network} NAME`"
                )));
            }
        }
        let members_json = serde_json::to_string(&members)
            .map_err(|e| StoreError::Invalid(format!("cannot encode the members: {e}")))?;
        tx.execute(
            "INSERT INTO names (network_id, name, nodes, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (network_id, name) DO UPDATE SET nodes = excluded.nodes, updated_at = excluded.updated_at",
            params![network_id, name, members_json, now as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes the name; whether it existed.
    pub fn remove_name(&mut self, network: &str, name: &str) -> Result<bool, StoreError> {
        let (network_id, _) = network_by_name(&self.conn, network)?;
        let n = self.conn.execute(
            "DELETE FROM names WHERE network_id = ?1 AND name = ?2",
            params![network_id, name.trim().to_ascii_lowercase()],
        )?;
        Ok(n > 0)
    }

    /// The network's names for several nodes, by name.
    pub fn names(&self, network: &str) -> Result<Vec<NameAlias>, StoreError> {
        let (network_id, _) = network_by_name(&self.conn, network)?;
        self.aliases(network_id)
    }

    /// The names for several nodes of the network with this id, by name, as nodes get them:
    /// with the members that have no control connection (or were removed) as `down`.
    pub fn aliases(&self, network_id: i64) -> Result<Vec<NameAlias>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, nodes FROM names WHERE network_id = ?1 ORDER BY name")?;
        let rows = stmt.query_map([network_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut connected = self.conn.prepare_cached(
            "SELECT 1 FROM nodes WHERE network_id = ?1 AND name = ?2 AND removed_at IS NULL AND connected = 1",
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (name, nodes) = row?;
            let nodes: Vec<String> = serde_json::from_str(&nodes).unwrap_or_default();
            let mut down = Vec::new();
            for n in &nodes {
                if !connected.exists(params![network_id, n])? {
                    down.push(n.clone());
                }
            }
            out.push(NameAlias { name, nodes, down });
        }
        Ok(out)
    }
}

/// Whether `name` is one of the network's names for several nodes (a joining node may not
/// take it).
pub(super) fn is_alias(tx: &Conn, network_id: i64, name: &str) -> Result<bool, StoreError> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM names WHERE network_id = ?1 AND name = ?2",
            params![network_id, name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The overlay address of the live node called `name`, if one is.
fn live_node(
    tx: &Conn,
    network_id: i64,
    name: &str,
) -> Result<Option<std::net::Ipv4Addr>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT address FROM nodes WHERE network_id = ?1 AND name = ?2 AND removed_at IS NULL",
            params![network_id, name],
            |r| r.get::<_, u32>(0),
        )
        .optional()?
        .map(std::net::Ipv4Addr::from))
}

/// Schema 5: the `names` table.
pub(super) fn migrate(tx: &Conn) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS names (
            network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            nodes TEXT NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (network_id, name)
        );",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, join_as, store, T0};
    use super::*;
    use crate::store::NameRequest;

    fn store_with(nodes: &[&str]) -> (super::super::tests::tempdir::Dir, Store) {
        let (d, mut s) = store();
        for (i, n) in nodes.iter().enumerate() {
            join(&mut s, i as u8 + 1, n).expect("join");
        }
        (d, s)
    }

    #[test]
    fn a_name_stands_for_live_nodes_and_is_listed() {
        let (_d, mut s) = store_with(&["cp1", "cp2", "cp3", "worker"]);
        s.set_name(
            "prod",
            "K8s-API",
            &["cp1".into(), "cp2".into(), "cp2".into()],
            T0,
        )
        .expect("set");
        let names = s.names("prod").expect("names");
        assert_eq!(
            names,
            vec![NameAlias {
                name: "k8s-api".into(),
                nodes: vec!["cp1".into(), "cp2".into()],
                down: Vec::new(),
            }]
        );
        // A member without a control connection is down.
        let id = crate::store::network_by_name(&s.conn, "prod")
            .expect("net")
            .0;
        s.disconnected(id, &super::super::tests::key(2), "r/1", T0)
            .expect("disconnect");
        assert_eq!(s.aliases(id).expect("names")[0].down, vec!["cp2"]);
        // Setting again replaces the members.
        s.set_name("prod", "k8s-api", &["cp3".into()], T0)
            .expect("set");
        assert_eq!(s.names("prod").expect("names")[0].nodes, vec!["cp3"]);
        assert!(s.remove_name("prod", "k8s-api").expect("remove"));
        assert!(!s.remove_name("prod", "k8s-api").expect("remove"));
        assert!(s.names("prod").expect("names").is_empty());
    }

    #[test]
    fn bad_names_say_what_is_wrong_and_change_nothing() {
        let (_d, mut s) = store_with(&["cp1", "worker"]);
        let err = |r: Result<(), StoreError>| r.expect_err("refused").to_string();
        let e = err(s.set_name("prod", "k8s_api", &["cp1".into()], T0));
        assert!(e.contains("not a valid name"), "{e}");
        let e = err(s.set_name("prod", "worker", &["cp1".into()], T0));
        assert!(e.contains("is the name of node"), "{e}");
        let e = err(s.set_name("prod", "api", &["cp9".into()], T0));
        assert!(e.contains("no node named \"cp9\""), "{e}");
        let e = err(s.set_name("prod", "api", &[], T0));
        assert!(e.contains("at least one node"), "{e}");
        let e = err(s.set_name("nope", "api", &["cp1".into()], T0));
        assert!(e.contains("no network named"), "{e}");
        assert!(s.names("prod").expect("names").is_empty());
    }

    #[test]
    fn a_joining_node_cannot_take_a_name_for_several_nodes() {
        let (_d, mut s) = store_with(&["cp1"]);
        s.set_name("prod", "k8s-api", &["cp1".into()], T0)
            .expect("set");
        let e = join_as(&mut s, 9, NameRequest::Exact("k8s-api")).expect_err("refused");
        assert!(e.to_string().contains("name for several nodes"), "{e}");
        // A default name steps aside, as for a taken node name.
        let a = join_as(&mut s, 9, NameRequest::Preferred("k8s-api")).expect("join");
        assert_eq!(a.name, "k8s-api-2");
    }
}
