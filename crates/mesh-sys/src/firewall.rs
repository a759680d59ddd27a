//! mesh's nftables table: TCP MSS clamping on the overlay interface, and the forwarding guard.
//!
//! **Forwarding guard.** A member may only send this node packets addressed to this node: the
//! core drops decrypted packets to any other destination (see `mesh_core`'s
//! `misdirected_packets`). As a second layer, packets that arrive on the overlay interface and
//! would be forwarded (with `ip_forward=1`, which Kubernetes needs) are dropped, except where
//! conntrack shows they are legitimate: a connection to this node that was DNATed to a pod (a
//! NodePort reached over the overlay), and replies to connections that left through the overlay
//! (a pod's traffic masqueraded to another node).
//!
//! Packets the node forwards into the mesh (pod traffic from a CNI) get their TCP MSS set to the
//! route MTU toward the destination (`rt mtu`). The per-peer host routes that carry a smaller
//! path MTU therefore clamp exactly the connections that need it. Locally opened connections
//! size their segments from the same routes without any rule.

use std::io::Write;
use std::process::{Command, Stdio};

/// Name of the nftables table mesh owns.
pub const TABLE: &str = "mesh";

/// The ruleset for `interface`: the table is deleted and re-created in one transaction, so
/// applying it again is harmless. The guard drops what peers send through this node to
/// anywhere else, except to `routed`: the prefixes the controller approved for this node (its
/// pod subnet), which it routes for its peers, and `exits`: the prefixes it offers as an exit,
/// where peers' packets leave masqueraded behind the node's own address (the world has no
/// route back to the overlay), unless they go into `routed` or back into the overlay.
pub fn ruleset(interface: &str, routed: &[ipnet::IpNet], exits: &[ipnet::IpNet]) -> String {
    // One rule of each kind per family that has prefixes: `ip daddr` matches IPv4 only and
    // `ip6 daddr` IPv6 only, inside the one `inet` table.
    let families = [("ip", false), ("ip6", true)];
    let set = |nets: &[ipnet::IpNet], v6: bool| {
        nets.iter()
            .filter(|n| matches!(n, ipnet::IpNet::V6(_)) == v6)
            .map(|n| n.trunc().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all: Vec<ipnet::IpNet> = routed.iter().chain(exits).copied().collect();
    let mut routed_rule = String::new();
    let mut masquerade = String::new();
    for (family, v6) in families {
        let all = set(&all, v6);
        if !all.is_empty() {
            routed_rule +=
                &format!("\t\tiifname \"{interface}\" {family} daddr {{ {all} }} accept\n");
        }
        let exits = set(exits, v6);
        if !exits.is_empty() {
            let routed = set(routed, v6);
            let keep = if routed.is_empty() {
                String::new()
            } else {
                format!("{family} daddr != {{ {routed} }} ")
            };
            masquerade += &format!(
                "\t\tiifname \"{interface}\" oifname != \"{interface}\" {keep}{family} daddr {{ {exits} }} masquerade\n"
            );
        }
    }
    let exit_chain = if masquerade.is_empty() {
        String::new()
    } else {
        format!(
            "\tchain exit {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             {masquerade}\
             \t}}\n"
        )
    };
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain clamp {{\n\
         \t\ttype filter hook forward priority mangle; policy accept;\n\
         \t\toifname \"{interface}\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu\n\
         \t}}\n\
         \tchain guard {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{interface}\" ct status dnat accept\n\
         \t\tiifname \"{interface}\" ct direction reply accept\n\
         {routed_rule}\
         \t\tiifname \"{interface}\" counter drop\n\
         \t}}\n\
         {exit_chain}\
         }}\n"
    )
}

/// Why clamping could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `nft` is not installed.
    #[error("nft not found (install nftables): TCP MSS on {0} is not clamped")]
    NoNft(String),
    /// `nft` refused the ruleset.
    #[error("nft refused the MSS clamping rules: {0}")]
    Refused(String),
}

fn nft(input: &str, interface: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| FirewallError::NoNft(interface.to_owned()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| FirewallError::Refused(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Installs (or refreshes) MSS clamping and the forwarding guard for `interface`, letting
/// through what peers send to `routed` and `exits` (see [`ruleset`]).
pub fn clamp_mss(
    interface: &str,
    routed: &[ipnet::IpNet],
    exits: &[ipnet::IpNet],
) -> Result<(), FirewallError> {
    nft(&ruleset(interface, routed, exits), interface)
}

/// Removes mesh's table (after `mesh leave`).
pub fn remove(interface: &str) -> Result<(), FirewallError> {
    nft(
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
        interface,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn ruleset_targets_the_interface_and_is_replaceable() {
        let r = super::ruleset("mesh0", &[], &[]);
        assert!(r.starts_with("table inet mesh\ndelete table inet mesh\n"));
        assert!(r.contains(
            "oifname \"mesh0\" tcp flags syn / syn,rst tcp option maxseg size set rt mtu"
        ));
        assert!(r.contains("iifname \"mesh0\" counter drop"));
        let guard = r.find("chain guard").unwrap_or(0);
        assert!(guard > 0 && r[guard..].find("ct status dnat accept") < r[guard..].find("drop"));
        assert!(!r.contains("daddr"));
        let routed = super::ruleset(
            "mesh0",
            &[
                "10.244.1.0/24".parse().unwrap(),
                "10.250.0.0/16".parse().unwrap(),
            ],
            &[],
        );
        let accept = routed
            .find("iifname \"mesh0\" ip daddr { 10.244.1.0/24, 10.250.0.0/16 } accept")
            .unwrap();
        assert!(accept < routed.find("counter drop").unwrap());
        assert!(!routed.contains("masquerade"));
        let exit = super::ruleset(
            "mesh0",
            &["10.244.1.0/24".parse().unwrap()],
            &["0.0.0.0/0".parse().unwrap()],
        );
        assert!(exit.contains("iifname \"mesh0\" ip daddr { 10.244.1.0/24, 0.0.0.0/0 } accept"));
        assert!(exit.contains(
            "iifname \"mesh0\" oifname != \"mesh0\" ip daddr != { 10.244.1.0/24 } ip daddr { 0.0.0.0/0 } masquerade"
        ));
        assert!(!exit.contains("ip6"), "no IPv6 rules without IPv6 prefixes");
    }

    #[test]
    fn ipv6_prefixes_get_ip6_rules_beside_the_ipv4_ones() {
        let r = super::ruleset(
            "mesh0",
            &[
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            &["::/0".parse().unwrap()],
        );
        assert!(r.contains("iifname \"mesh0\" ip daddr { 10.244.1.0/24 } accept"));
        assert!(r.contains("iifname \"mesh0\" ip6 daddr { fd00:10:244:1::/64, ::/0 } accept"));
        assert!(r.contains(
            "iifname \"mesh0\" oifname != \"mesh0\" ip6 daddr != { fd00:10:244:1::/64 } ip6 daddr { ::/0 } masquerade"
        ));
        assert!(
            !r.contains("ip daddr { 0.0.0.0/0 }"),
            "an IPv6 exit is no IPv4 one"
        );
        let accept = r.find("ip6 daddr {").unwrap();
        assert!(accept < r.find("counter drop").unwrap());
    }
}
