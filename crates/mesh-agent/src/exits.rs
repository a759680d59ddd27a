//! Exits: prefixes a node offers to reach through its own uplink (`--advertise-exit
//! 0.0.0.0/0`), and the ones this node chose to use (`--exit-node NODE`, `--use-routes
//! "PREFIX via NODE"`). A peer's exit is used only by choice, only once the controller approved
//! it, and only for what it covers; mesh's own packets never follow it (see
//! [`mesh_sys::exits`]).

use ipnet::IpNet;
use mesh_proto::control::PeerInfo;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

/// A prefix this node sends through a peer's exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitUse {
    /// What goes through the exit (`0.0.0.0/0`, `::/0`: everything of that family without a
    /// more specific route).
    pub prefix: IpNet,
    /// The exit node, by node name.
    pub node: String,
}

impl std::fmt::Display for ExitUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.prefix, self.node)
    }
}

/// Parses `--use-routes`: comma-separated `PREFIX via NODE` ("" for none).
pub fn parse_uses(list: &str) -> Result<Vec<ExitUse>, String> {
    let mut out: Vec<ExitUse> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let words: Vec<&str> = item.split_whitespace().collect();
        let [prefix, "via", node] = words.as_slice() else {
            return Err(format!(
                "{item:?} is not `PREFIX via NODE` (e.g. \"198.51.100.0/24 via site-a\")"
            ));
        };
        let prefix: IpNet = prefix.parse().map_err(|_| {
            format!(
                "{prefix:?} is not an IP prefix (expected e.g. 198.51.100.0/24 or 2001:db8::/32)"
            )
        })?;
        if prefix.trunc() != prefix {
            return Err(format!(
                "{prefix} has host bits set; did you mean {}?",
                prefix.trunc()
            ));
        }
        if !mesh_proto::control::valid_name(node) {
            return Err(format!("{node:?} is not a node name"));
        }
        let u = ExitUse {
            prefix,
            node: (*node).to_owned(),
        };
        if out.iter().any(|o| o.prefix == u.prefix) {
            return Err(format!(
                "{prefix} is given twice; one node is the exit for a prefix"
            ));
        }
        out.push(u);
    }
    Ok(out)
}

/// What is in use: each chosen prefix with the key of its exit, when the named peer offers an
/// approved exit that covers it.
pub fn active(
    uses: &[ExitUse],
    peers: &[PeerInfo],
) -> Vec<(ExitUse, Option<mesh_proto::PublicKey>)> {
    uses.iter()
        .map(|u| {
            let key = peers
                .iter()
                .find(|p| p.name == u.node && p.exits.iter().any(|e| e.contains(&u.prefix)))
                .map(|p| p.key);
            (u.clone(), key)
        })
        .collect()
}

/// The prefixes in use: those an approved exit of the named peer covers now.
pub fn in_use(uses: &[ExitUse], peers: &[PeerInfo]) -> Vec<IpNet> {
    active(uses, peers)
        .into_iter()
        .filter(|(_, key)| key.is_some())
        .map(|(u, _)| u.prefix)
        .collect()
}

/// The peer list as the data plane gets it: each exit's used prefixes among its routes, so
/// that packets to them go to it and it may answer from them.
pub fn with_exits(mut peers: Vec<PeerInfo>, uses: &[ExitUse]) -> Vec<PeerInfo> {
    for (u, key) in active(uses, &peers) {
        if let Some(p) = key.and_then(|k| peers.iter_mut().find(|p| p.key == k)) {
            if !p.routes.contains(&u.prefix) {
                p.routes.push(u.prefix);
            }
        }
    }
    peers
}

/// Keeps the kernel's exit routes (their own table, see [`mesh_sys::exits`]) equal to the
/// prefixes in use; removes them when the watch closes.
pub async fn run(
    interface: String,
    source: (std::net::Ipv4Addr, Option<std::net::Ipv6Addr>),
    mut used: watch::Receiver<Vec<IpNet>>,
) {
    // None: not yet applied (the first pass also clears what a crashed run left).
    let mut installed: Option<Vec<IpNet>> = None;
    loop {
        let wanted = used.borrow_and_update().clone();
        if installed.as_ref() != Some(&wanted) {
            match mesh_sys::exits::install(&interface, source, &wanted).await {
                Ok(()) => {
                    if wanted.is_empty() {
                        if installed.as_ref().is_some_and(|i| !i.is_empty()) {
                            info!("no exit in use");
                        }
                    } else {
                        info!(prefixes = ?wanted, "sending these prefixes through the exit");
                    }
                    installed = Some(wanted);
                }
                Err(e) => warn!(error = %e, "cannot route through the exit"),
            }
        }
        if used.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_parse_with_errors_that_say_what_to_type() {
        let u = parse_uses("0.0.0.0/0 via site-a, 198.51.100.0/24 via mirror").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].to_string(), "198.51.100.0/24 via mirror");
        assert!(parse_uses("").unwrap().is_empty());
        assert!(parse_uses("0.0.0.0/0")
            .unwrap_err()
            .contains("PREFIX via NODE"));
        assert!(parse_uses("10.0.0.1/8 via a")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_uses("0.0.0.0/0 via a, 0.0.0.0/0 via b")
            .unwrap_err()
            .contains("twice"));
    }

    fn peer(name: &str, n: u8, exits: &[&str]) -> PeerInfo {
        PeerInfo {
            key: mesh_proto::PublicKey([n; 32]),
            name: name.into(),
            address: std::net::Ipv4Addr::new(100, 64, 0, n),
            address6: None,
            endpoints: vec![],
            relay: None,
            observed: None,
            nat: None,
            routes: vec![],
            exits: exits.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn only_an_approved_exit_of_the_named_node_is_used() {
        let peers = vec![peer("site-a", 1, &["0.0.0.0/0"]), peer("b", 2, &[])];
        let uses = parse_uses("0.0.0.0/0 via site-a, 203.0.113.0/24 via site-a, 10.9.0.0/16 via b")
            .unwrap();
        let a = active(&uses, &peers);
        assert_eq!(a[0].1, Some(peers[0].key));
        assert_eq!(a[1].1, Some(peers[0].key), "inside the offered exit");
        assert_eq!(a[2].1, None, "b offers no exit");
        let data = with_exits(peers, &uses);
        assert_eq!(data[0].routes.len(), 2);
        assert!(data[1].routes.is_empty());
    }
}
