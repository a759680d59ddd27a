//! Node names on this node: the table the DNS responder ([`crate::dns`]) answers from, and the
//! optional block in /etc/hosts ([`crate::hosts`]), both kept in step with the peer list and
//! the network's names for several nodes (`mesh-controller name set`).
//!
//! Names answer with the nodes' IPv4 overlay addresses (A) and, on a network with an IPv6
//! overlay, their IPv6 ones (AAAA; both in the hosts block).
//!
//! A name for several nodes answers with the members the controller sees online; when it sees
//! none, with every member (an address that may answer beats no answer at all for kubeadm's
//! controlPlaneEndpoint). Members this node does not know (not in its peer list) are left out.

use crate::dns::{NameTable, Node};
use mesh_proto::control::{Ipv6Net, NameAlias};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// The system's hosts file.
pub const HOSTS_FILE: &str = "/etc/hosts";

/// What the names come from.
pub struct Sources {
    /// The network's name (the zone is `<network>.mesh`).
    pub network: String,
    /// This node's name and IPv4 overlay address.
    pub own: (String, Ipv4Addr),
    /// This node's IPv6 overlay address (and the network's prefix), which a welcome may give
    /// or move while the node runs.
    pub own6: watch::Receiver<Option<(Ipv6Addr, Ipv6Net)>>,
    /// The peers' names and addresses, as the control connection learns them.
    pub peers: watch::Receiver<Vec<Node>>,
    /// The network's names for several nodes.
    pub aliases: watch::Receiver<Vec<NameAlias>>,
}

/// The table for this node, its peers and the names for several nodes.
pub fn table(network: &str, own: &Node, peers: &[Node], aliases: &[NameAlias]) -> NameTable {
    let mut nodes: Vec<Node> = Vec::with_capacity(peers.len() + 1);
    nodes.push(own.clone());
    nodes.extend(peers.iter().cloned());
    let by_name: HashMap<&str, &Node> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let aliases = aliases
        .iter()
        .filter_map(|alias| {
            let known = |names: &mut dyn Iterator<Item = &String>| -> Vec<IpAddr> {
                let mut a: Vec<IpAddr> = names
                    .filter_map(|n| by_name.get(n.as_str()))
                    .flat_map(|node| {
                        std::iter::once(IpAddr::V4(node.address))
                            .chain(node.address6.map(IpAddr::V6))
                    })
                    .collect();
                a.sort();
                a.dedup();
                a
            };
            let up = known(&mut alias.nodes.iter().filter(|n| !alias.down.contains(n)));
            let addresses = if up.is_empty() {
                known(&mut alias.nodes.iter())
            } else {
                up
            };
            (!addresses.is_empty()).then(|| (alias.name.clone(), addresses))
        })
        .collect();
    NameTable {
        network: network.to_owned(),
        nodes,
        aliases,
    }
}

/// Keeps `table_tx` (and the hosts file, when `hosts` is set) in step with the sources until
/// `shutdown`. The hosts block is written only when it changes.
pub async fn run(
    mut sources: Sources,
    table_tx: watch::Sender<Arc<NameTable>>,
    hosts: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_error: Option<String> = None;
    let mut own6_open = true;
    loop {
        let own = Node {
            name: sources.own.0.clone(),
            address: sources.own.1,
            address6: sources.own6.borrow_and_update().map(|(a, _)| a),
        };
        let t = table(
            &sources.network,
            &own,
            &sources.peers.borrow_and_update(),
            &sources.aliases.borrow_and_update(),
        );
        if let Some(path) = &hosts {
            let block = crate::hosts::render(&t.hosts_entries(), &sources.network);
            match crate::hosts::update(path, &sources.network, Some(&block)) {
                Ok(changed) => {
                    if changed {
                        info!(path = %path.display(), "node names written to the hosts file");
                    }
                    last_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        warn!(path = %path.display(), error = %e, "cannot keep the node names in the hosts file");
                    }
                    last_error = Some(e);
                }
            }
        }
        table_tx.send_if_modified(|current| {
            let changed = **current != t;
            if changed {
                *current = Arc::new(t);
            }
            changed
        });
        tokio::select! {
            r = sources.peers.changed() => if r.is_err() { return },
            r = sources.aliases.changed() => if r.is_err() { return },
            // The node's own IPv6 address stops changing when its sender goes; names go on.
            r = sources.own6.changed(), if own6_open => own6_open = r.is_ok(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Where systemd-resolved listens while it runs.
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// Tells systemd-resolved, where it runs, to ask this node's responder for `.mesh` names and to
/// try `<network>.mesh` for bare names on `interface` (what `resolvectl dns|domain` do by hand).
/// The settings go with the interface. `Ok(false)`: resolved does not run here.
pub async fn tell_resolved(
    interface: &str,
    address: Ipv4Addr,
    network: &str,
) -> Result<bool, String> {
    if !std::path::Path::new(RESOLVED_SOCKET).exists() {
        return Ok(false);
    }
    let zone = format!("{network}.mesh");
    for args in resolvectl_args(interface, address, &zone) {
        let run = tokio::process::Command::new("resolvectl")
            .args(&args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => {
                return Err(format!(
                    "resolvectl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(Err(e)) => return Err(format!("cannot run resolvectl: {e}")),
            Err(_) => {
                return Err(format!(
                    "resolvectl {} did not finish in 5 s",
                    args.join(" ")
                ))
            }
        }
    }
    Ok(true)
}

/// The two `resolvectl` calls: the DNS server of the link, and its domains (the search domain
/// for bare names, and `~mesh` to route every `.mesh` name to it).
fn resolvectl_args(interface: &str, address: Ipv4Addr, zone: &str) -> [Vec<String>; 2] {
    [
        vec!["dns".into(), interface.into(), address.to_string()],
        vec![
            "domain".into(),
            interface.into(),
            zone.into(),
            "~mesh".into(),
        ],
    ]
}

/// Takes this network's block out of the hosts file (when the node leaves or goes down).
pub fn remove_hosts_block(network: &str) {
    let path = std::path::Path::new(HOSTS_FILE);
    match crate::hosts::update(path, network, None) {
        Ok(true) => info!(path = HOSTS_FILE, "node names removed from the hosts file"),
        Ok(false) => {}
        Err(e) => {
            warn!(path = HOSTS_FILE, error = %e, "cannot remove the node names from the hosts file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(name: &str, nodes: &[&str], down: &[&str]) -> NameAlias {
        NameAlias {
            name: name.into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            down: down.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn resolved_gets_the_server_and_the_domains_of_the_link() {
        let [dns, domain] = resolvectl_args("mesh0", Ipv4Addr::new(100, 64, 0, 1), "prod.mesh");
        assert_eq!(dns, ["dns", "mesh0", "100.64.0.1"]);
        assert_eq!(domain, ["domain", "mesh0", "prod.mesh", "~mesh"]);
    }

    fn node(name: &str, last: u8, dual: bool) -> Node {
        Node {
            name: name.into(),
            address: Ipv4Addr::new(100, 64, 0, last),
            address6: dual.then(|| Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, last.into())),
        }
    }

    fn v4(last: u8) -> IpAddr {
        Ipv4Addr::new(100, 64, 0, last).into()
    }

    fn v6(last: u16) -> IpAddr {
        Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, last).into()
    }

    #[test]
    fn a_name_for_several_nodes_answers_with_the_members_online() {
        let own = node("cp1", 1, true);
        let peers = vec![
            node("cp2", 2, true),
            node("cp3", 3, true),
            node("worker", 4, true),
        ];
        let t = table(
            "prod",
            &own,
            &peers,
            &[
                alias("k8s-api", &["cp1", "cp2", "cp3"], &["cp2"]),
                alias("all-down", &["cp2", "cp3"], &["cp2", "cp3"]),
                alias("unknown", &["gone"], &[]),
            ],
        );
        assert_eq!(t.nodes.len(), 4);
        assert_eq!(t.nodes[0], own);
        assert_eq!(
            t.aliases,
            vec![
                ("k8s-api".to_owned(), vec![v4(1), v4(3), v6(1), v6(3)]),
                ("all-down".to_owned(), vec![v4(2), v4(3), v6(2), v6(3)]),
            ]
        );
    }

    #[test]
    fn nodes_without_ipv6_give_aliases_ipv4_only() {
        // A network created with --cidr6 off: no node has address6.
        let t = table(
            "prod",
            &node("cp1", 1, false),
            &[node("cp2", 2, false)],
            &[alias("k8s-api", &["cp1", "cp2"], &[])],
        );
        assert_eq!(t.aliases, vec![("k8s-api".to_owned(), vec![v4(1), v4(2)])]);
        assert!(t.nodes.iter().all(|n| n.address6.is_none()));
    }
}
