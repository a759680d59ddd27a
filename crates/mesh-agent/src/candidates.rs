//! Which of the node's own addresses it offers its peers as endpoint candidates.
//!
//! An address is worth offering only if a peer can reach this host at it over the underlay.
//! Many hosts hold addresses that are no such path. A Kubernetes node in kube-proxy's IPVS mode
//! holds every ClusterIP (10.96.0.0/12, often dozens) on the dummy interface `kube-ipvs0`;
//! Docker puts 172.17.0.1 on the bridge `docker0`, libvirt 192.168.122.1 on `virbr0`. Every
//! other node holds the same addresses, so a peer that probes them reaches itself. Another VPN's
//! or overlay's address (Tailscale, ZeroTier, WireGuard, a CNI's vxlan) would at best run mesh
//! inside that VPN. The list a node reports is short ([`REPORTED`]), and every such address
//! takes the place of one that works.
//!
//! Whether an interface's addresses are offered ([`verdict`]); the first rule that applies
//! decides:
//! 1. a deny pattern of the operator's list (`--endpoint-interfaces '!docker*'`) matches: skip;
//! 2. the list has allow patterns (`eth0,ens*`): offer if one matches, else skip;
//! 3. a default route of the main table leaves through it (the host's uplink, whatever it is: a
//!    bridge on a VM host, a veth in a container): offer;
//! 4. its link kind is one of [`SKIPPED_KINDS`] (bridges, dummies, tunnels): skip;
//! 5. its name matches one of [`SKIPPED_NAMES`] (container, pod-network and VPN devices whose
//!    kind says nothing, such as a veth): skip;
//! 6. otherwise offer: physical NICs (no link kind), bonds, VLANs, macvlans, veths. A veth is
//!    not skipped for its kind: in containers and many VMs (and in the test lab) the host's own
//!    `eth0` is one.
//!
//! The overlay interface, interfaces stacked on it, loopback and link-local addresses never
//! reach these rules ([`mesh_sys::netlink::overlay_view`] leaves them out), so no pattern can
//! bring them back.
//!
//! [`report`] then keeps room for the public mappings: the one the router grants on request
//! ([`crate::portmap`]) and those that standalone relays observe. Local addresses get only the
//! places those leave.

use mesh_proto::control::MAX_ENDPOINTS;
use mesh_sys::netlink::LocalAddress;
use std::net::SocketAddr;

/// How many candidates a node reports: the controller puts its own observation of the node in
/// front, and a peer gets at most [`MAX_ENDPOINTS`] in all.
pub const REPORTED: usize = MAX_ENDPOINTS - 1;

/// Link kinds (`IFLA_INFO_KIND`) whose addresses are no path to this host, and why.
pub const SKIPPED_KINDS: &[(&str, &str)] = &[
    (
        "bridge",
        "a bridge for containers or VMs (docker0, cni0, virbr0) holds a private range every host reuses",
    ),
    (
        "dummy",
        "a dummy interface holds service addresses every node has (kube-ipvs0: every ClusterIP)",
    ),
    (
        "tun",
        "a TUN device belongs to another VPN (OpenVPN, Tailscale, ZeroTier, wireguard-go)",
    ),
    ("wireguard", "a WireGuard interface belongs to another VPN"),
    (
        "vxlan",
        "a vxlan device belongs to an overlay network (flannel.1, cilium_vxlan)",
    ),
    ("geneve", "a geneve device belongs to an overlay network (OVN, Cilium)"),
    ("ipip", "an IP-in-IP tunnel (Calico) is not the underlay"),
    ("sit", "an IPv6-in-IPv4 tunnel is not the underlay"),
    ("gre", "a GRE tunnel is not the underlay"),
    ("gretap", "a GRE tunnel is not the underlay"),
    ("ip6tnl", "an IPv6 tunnel is not the underlay"),
    ("ip6gre", "a GRE tunnel is not the underlay"),
    ("ip6gretap", "a GRE tunnel is not the underlay"),
    ("vti", "an IPsec tunnel is not the underlay"),
    ("vti6", "an IPsec tunnel is not the underlay"),
    ("xfrm", "an IPsec tunnel is not the underlay"),
];

/// Interface names (glob patterns) of devices whose kind does not give them away, and why.
pub const SKIPPED_NAMES: &[(&str, &str)] = &[
    ("docker*", "Docker's bridges (docker0, docker_gwbridge)"),
    ("br-*", "Docker's user-defined networks"),
    (
        "virbr*",
        "libvirt's NAT network (192.168.122.1 on every host)",
    ),
    ("cni*", "a CNI bridge (cni0, cni-podman0)"),
    (
        "kube-*",
        "kube-proxy's and kube-router's devices (kube-ipvs0, kube-bridge)",
    ),
    ("cali*", "Calico's pod interfaces"),
    ("cilium*", "Cilium's devices (cilium_host, cilium_vxlan)"),
    (
        "lxc*",
        "container interfaces (Cilium's pod ends, LXC/LXD bridges)",
    ),
    ("flannel*", "flannel's overlay"),
    ("weave*", "Weave Net's overlay"),
    ("veth*", "the host end of a container's veth pair"),
    ("zt*", "ZeroTier, another VPN"),
    ("tailscale*", "Tailscale, another VPN"),
    ("wg*", "WireGuard, another VPN"),
];

/// The longest interface name Linux allows (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;

/// Why a pattern of an interface list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Two commas in a row, or a comma at an end.
    #[error("empty pattern (two commas in a row, or a comma at an end); separate patterns with single commas, e.g. \"eth0,ens*\"")]
    Empty,
    /// `!` with nothing after it.
    #[error("pattern \"!\" names no interface; put a name or glob after the !, e.g. \"!docker*\"")]
    BareNot,
    /// A `!` that is not the first character.
    #[error("pattern {0:?}: ! may only come first, to deny (\"!docker*\")")]
    MisplacedNot(String),
    /// Glob syntax other than `*` and `?`.
    #[error("pattern {pattern:?}: {what} are not supported; use * (any characters) and ? (one character), e.g. \"eth*\"")]
    Unsupported {
        /// The pattern as written.
        pattern: String,
        /// What it used.
        what: &'static str,
    },
    /// A character no interface name has.
    #[error("pattern {pattern:?}: {found:?} cannot be part of an interface name")]
    BadChar {
        /// The pattern as written.
        pattern: String,
        /// The character.
        found: char,
    },
    /// More fixed characters than any interface name has.
    #[error("pattern {0:?} matches nothing: interface names have at most 15 characters")]
    TooLong(String),
}

/// One pattern of an interface list: a glob on interface names, allowing or denying.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    glob: String,
    deny: bool,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, PatternError> {
        let (deny, glob) = match text.strip_prefix('!') {
            Some("") => return Err(PatternError::BareNot),
            Some(rest) => (true, rest),
            None => (false, text),
        };
        for c in glob.chars() {
            let unsupported = match c {
                '[' | ']' => Some("character classes ([...])"),
                '{' | '}' => Some("alternatives ({a,b})"),
                '\\' => Some("escapes (\\)"),
                _ => None,
            };
            if let Some(what) = unsupported {
                return Err(PatternError::Unsupported {
                    pattern: text.to_owned(),
                    what,
                });
            }
            if c == '!' {
                return Err(PatternError::MisplacedNot(text.to_owned()));
            }
            // What Linux refuses in a name (dev_valid_name), and quotes, which only show up
            // in a name by a quoting mistake.
            if c == '/' || c == ':' || c == '"' || c == '\'' || c.is_whitespace() || c.is_control()
            {
                return Err(PatternError::BadChar {
                    pattern: text.to_owned(),
                    found: c,
                });
            }
        }
        if glob.chars().filter(|c| *c != '*').count() > MAX_IFNAME {
            return Err(PatternError::TooLong(text.to_owned()));
        }
        Ok(Pattern {
            glob: glob.to_owned(),
            deny,
        })
    }

    fn matches(&self, name: &str) -> bool {
        glob_match(&self.glob, name)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.deny {
            f.write_str("!")?;
        }
        f.write_str(&self.glob)
    }
}

/// Whether `name` matches `glob`, where `*` stands for any characters (none too) and `?` for
/// exactly one. Case-sensitive, as interface names are.
fn glob_match(glob: &str, name: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut gi, mut ni) = (0, 0);
    // The last `*` seen and where in `name` it currently stops matching.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ni));
                gi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again from there.
                Some((sg, sn)) => {
                    star = Some((sg, sn + 1));
                    gi = sg + 1;
                    ni = sn + 1;
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

/// The operator's list of endpoint interfaces (`--endpoint-interfaces`, `endpoint_interfaces`
/// in the config file): comma-separated glob patterns on interface names, `*` for any
/// characters and `?` for one. A pattern with a leading `!` denies. With one or more allow
/// patterns, only the interfaces they match are used (`eth0,ens*`); with deny patterns only,
/// the defaults apply and the denied interfaces are skipped as well (`!docker*,!br-*`). Deny
/// wins over allow (`eth*,!eth1`). Empty: the defaults alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInterfaces {
    patterns: Vec<Pattern>,
}

impl EndpointInterfaces {
    /// Whether this is the empty list: the defaults alone.
    pub fn is_default(&self) -> bool {
        self.patterns.is_empty()
    }

    fn denied_by(&self, name: &str) -> Option<&Pattern> {
        self.patterns.iter().find(|p| p.deny && p.matches(name))
    }

    /// `None` without allow patterns; else whether one matches.
    fn allowed(&self, name: &str) -> Option<bool> {
        let mut allow = self.patterns.iter().filter(|p| !p.deny).peekable();
        allow.peek()?;
        Some(allow.any(|p| p.matches(name)))
    }
}

impl std::str::FromStr for EndpointInterfaces {
    type Err = PatternError;

    /// Parses a LIST; spaces around the commas are fine; an empty or blank LIST is the
    /// defaults.
    fn from_str(list: &str) -> Result<EndpointInterfaces, PatternError> {
        if list.trim().is_empty() {
            return Ok(EndpointInterfaces::default());
        }
        let patterns = list
            .split(',')
            .map(|p| match p.trim() {
                "" => Err(PatternError::Empty),
                p => Pattern::parse(p),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EndpointInterfaces { patterns })
    }
}

impl std::fmt::Display for EndpointInterfaces {
    /// The LIST in its canonical form (what [`str::parse`] takes back).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.patterns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why an interface's addresses are not offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// A deny pattern of the operator's list matches (the pattern, with its `!`).
    Denied(String),
    /// The operator's list has allow patterns and none matches.
    NotListed,
    /// The link kind is one of [`SKIPPED_KINDS`].
    Kind {
        /// The kind.
        kind: &'static str,
        /// Why it is skipped.
        why: &'static str,
    },
    /// The name matches one of [`SKIPPED_NAMES`].
    Name {
        /// The pattern that matched.
        pattern: &'static str,
        /// Whose device it is.
        why: &'static str,
    },
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Denied(p) => write!(f, "denied by the endpoint interface list ({p})"),
            Skip::NotListed => f.write_str("not in the endpoint interface list"),
            Skip::Kind { kind, why } => write!(f, "link kind {kind}: {why}"),
            Skip::Name { pattern, why } => write!(f, "name matches {pattern}: {why}"),
        }
    }
}

/// What the rules (module docs) say about the addresses of interface `name` of link kind
/// `kind` (`None`: a physical NIC), which is the uplink of a default route if `uplink`.
/// `None`: offer them.
pub fn verdict(
    name: &str,
    kind: Option<&str>,
    uplink: bool,
    list: &EndpointInterfaces,
) -> Option<Skip> {
    if let Some(p) = list.denied_by(name) {
        return Some(Skip::Denied(p.to_string()));
    }
    if let Some(allowed) = list.allowed(name) {
        return (!allowed).then_some(Skip::NotListed);
    }
    if uplink {
        return None;
    }
    if let Some((kind, why)) = kind.and_then(|k| SKIPPED_KINDS.iter().find(|(s, _)| *s == k)) {
        return Some(Skip::Kind { kind, why });
    }
    SKIPPED_NAMES
        .iter()
        .find(|(pattern, _)| glob_match(pattern, name))
        .map(|(pattern, why)| Skip::Name { pattern, why })
}

/// The addresses of `local` that [`verdict`] lets through, the uplinks' first (the likeliest
/// to work), IPv4 before IPv6 and stable IPv6 before temporary (privacy) addresses, otherwise
/// in the kernel's order. A temporary address is offered only for an interface without a
/// stable IPv6 address, and one per interface.
pub fn offered<'a>(local: &'a [LocalAddress], list: &EndpointInterfaces) -> Vec<&'a LocalAddress> {
    let mut out: Vec<&LocalAddress> = local
        .iter()
        .filter(|a| verdict(&a.interface, a.kind.as_deref(), a.uplink, list).is_none())
        .filter(|a| !a.temporary || !has_stable_v6(local, &a.interface))
        .collect();
    // Uplinks first; within each, IPv4, then stable IPv6, then temporary IPv6 (a privacy
    // address is replaced within a day, a stable one stays the same path).
    out.sort_by_key(|a| (!a.uplink, a.address.is_ipv6(), a.temporary));
    // One temporary address per interface is enough: they all lead to the same host.
    let mut seen: Vec<&str> = Vec::new();
    out.retain(|a| {
        if !a.temporary {
            return true;
        }
        let first = !seen.contains(&a.interface.as_str());
        seen.push(&a.interface);
        first
    });
    out
}

/// Whether `interface` has a stable (not temporary) global IPv6 address among `local`.
fn has_stable_v6(local: &[LocalAddress], interface: &str) -> bool {
    local
        .iter()
        .any(|a| a.interface == interface && a.address.is_ipv6() && !a.temporary)
}

/// One interface whose addresses are not offered, for `mesh status` and the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The interface.
    pub interface: String,
    /// Its link kind, if it has one.
    pub kind: Option<String>,
    /// How many of its addresses are left out.
    pub addresses: usize,
    /// Why ([`Skip`] in words).
    pub reason: String,
}

/// The interfaces of `local` whose addresses are not offered, each once, in the kernel's order.
pub fn skipped(local: &[LocalAddress], list: &EndpointInterfaces) -> Vec<Skipped> {
    let mut out: Vec<Skipped> = Vec::new();
    for a in local {
        if let Some(s) = out.iter_mut().find(|s| s.interface == a.interface) {
            s.addresses += 1;
            continue;
        }
        if let Some(skip) = verdict(&a.interface, a.kind.as_deref(), a.uplink, list) {
            out.push(Skipped {
                interface: a.interface.clone(),
                kind: a.kind.clone(),
                addresses: 1,
                reason: skip.to_string(),
            });
        }
    }
    out
}

/// The node's public mappings, as [`report`] takes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mappings<'a> {
    /// The router's mapping of the port (UPnP IGD, NAT-PMP, PCP), if it granted one.
    pub router: Option<SocketAddr>,
    /// The mappings standalone relays observe.
    pub relays: &'a [SocketAddr],
    /// The controller's own observation (it puts that one first itself).
    pub controller: Option<SocketAddr>,
}

/// The candidates a node reports to the controller, at most [`REPORTED`]: its offered local
/// addresses with its UDP `port`, then its public mappings: the router's first, then those
/// standalone relays observe.
///
/// Every distinct mapping has a place, whatever the number of local addresses (the router's
/// before any relay's): local addresses get only the places the mappings leave. A mapping
/// equal to the controller's own observation takes none, since the controller puts that one
/// first anyway, nor does a local address that is also a mapping (a host with a public
/// address).
pub fn report(
    local: &[LocalAddress],
    list: &EndpointInterfaces,
    port: u16,
    mapped: Mappings<'_>,
) -> Vec<SocketAddr> {
    let mut mappings: Vec<SocketAddr> = Vec::new();
    for m in mapped.router.iter().chain(mapped.relays) {
        if Some(*m) != mapped.controller && !mappings.contains(m) && mappings.len() < REPORTED {
            mappings.push(*m);
        }
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in offered(local, list) {
        if out.len() + mappings.len() >= REPORTED {
            break;
        }
        let e = SocketAddr::from((a.address, port));
        if !out.contains(&e) && !mappings.contains(&e) {
            out.push(e);
        }
    }
    out.extend(mappings);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn list(s: &str) -> EndpointInterfaces {
        s.parse().unwrap()
    }

    /// Mappings that relays observed (and what the controller saw), no router mapping.
    fn relays(relays: &[SocketAddr], controller: Option<SocketAddr>) -> Mappings<'_> {
        Mappings {
            router: None,
            relays,
            controller,
        }
    }

    fn skipped_for(name: &str, kind: Option<&str>, uplink: bool, l: &str) -> Option<Skip> {
        verdict(name, kind, uplink, &list(l))
    }

    fn addr(ip: [u8; 4], interface: &str, kind: Option<&str>, uplink: bool) -> LocalAddress {
        LocalAddress {
            address: Ipv4Addr::from(ip).into(),
            temporary: false,
            interface: interface.into(),
            kind: kind.map(str::to_owned),
            uplink,
        }
    }

    fn addr6(ip: &str, interface: &str, temporary: bool) -> LocalAddress {
        LocalAddress {
            address: ip.parse().unwrap(),
            temporary,
            interface: interface.into(),
            kind: None,
            uplink: true,
        }
    }

    #[test]
    fn stable_ipv6_addresses_are_offered_after_ipv4_and_temporary_ones_only_without_them() {
        let local = vec![
            addr6("2001:db8:1::aaaa", "eth0", true),
            addr6("2001:db8:1::1", "eth0", false),
            addr([198, 51, 100, 10], "eth0", None, true),
            addr6("2001:db8:1::bbbb", "eth0", true),
            addr6("2001:db8:2::cccc", "wlan0", true),
            addr6("2001:db8:2::dddd", "wlan0", true),
        ];
        let got: Vec<String> = offered(&local, &list(""))
            .iter()
            .map(|a| a.address.to_string())
            .collect();
        assert_eq!(got, ["198.51.100.10", "2001:db8:1::1", "2001:db8:2::cccc"]);
        let reported = report(&local, &list(""), 7000, Mappings::default());
        assert_eq!(reported[1], "[2001:db8:1::1]:7000".parse().unwrap());
    }

    #[test]
    fn globs_match_names() {
        for (glob, name) in [
            ("eth0", "eth0"),
            ("eth*", "eth0"),
            ("eth*", "eth"),
            ("*", "anything"),
            ("br-*", "br-4f2a9c"),
            ("e?s*", "ens3"),
            ("*ipvs*", "kube-ipvs0"),
            ("a*b*c", "a-b-b-c"),
            ("*0", "docker0"),
        ] {
            assert!(glob_match(glob, name), "{glob} should match {name}");
        }
        for (glob, name) in [
            ("eth0", "eth01"),
            ("eth0", "Eth0"),
            ("eth?", "eth"),
            ("br-*", "br0"),
            ("a*b*c", "a-b-b-cd"),
            ("", "eth0"),
            ("*0", "docker1"),
        ] {
            assert!(!glob_match(glob, name), "{glob} should not match {name}");
        }
    }

    #[test]
    fn lists_parse_and_print_back() {
        let l = list(" eth0, ens* ,!docker*");
        assert_eq!(l.to_string(), "eth0,ens*,!docker*");
        assert_eq!(list(&l.to_string()), l);
        assert!(list("").is_default());
        assert!(list("  ").is_default());
        assert!(!list("!x").is_default());
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        let err = |s: &str| s.parse::<EndpointInterfaces>().unwrap_err();
        assert_eq!(err("eth0,,ens*"), PatternError::Empty);
        assert_eq!(err("eth0,"), PatternError::Empty);
        assert_eq!(err("!"), PatternError::BareNot);
        assert_eq!(err("eth!0"), PatternError::MisplacedNot("eth!0".into()));
        assert_eq!(err("!!eth0"), PatternError::MisplacedNot("!!eth0".into()));
        let e = err("eth[01]");
        assert!(
            matches!(&e, PatternError::Unsupported { pattern, .. } if pattern == "eth[01]"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("eth[01]") && text.contains("not supported") && text.contains('*'),
            "{text}"
        );
        assert!(matches!(
            err("{eth0,eth1}"),
            PatternError::Unsupported { .. } | PatternError::Empty
        ));
        assert_eq!(
            err("eth 0"),
            PatternError::BadChar {
                pattern: "eth 0".into(),
                found: ' '
            }
        );
        assert!(matches!(
            err("net/eth0"),
            PatternError::BadChar { found: '/', .. }
        ));
        assert!(matches!(
            err("eth0:1"),
            PatternError::BadChar { found: ':', .. }
        ));
        assert!(matches!(
            err("\"eth0\""),
            PatternError::BadChar { found: '"', .. }
        ));
        assert_eq!(
            err("a-very-long-interface"),
            PatternError::TooLong("a-very-long-interface".into())
        );
        // Stars do not count toward the length.
        assert!("*fifteen-chars-x*".parse::<EndpointInterfaces>().is_ok());
    }

    #[test]
    fn defaults_skip_what_is_no_path_and_keep_uplinks() {
        let none = "";
        // The Kubernetes node of the issue: ClusterIPs on a dummy, Docker's bridge.
        assert!(matches!(
            skipped_for("kube-ipvs0", Some("dummy"), false, none),
            Some(Skip::Kind { kind: "dummy", .. })
        ));
        assert!(matches!(
            skipped_for("docker0", Some("bridge"), false, none),
            Some(Skip::Kind { kind: "bridge", .. })
        ));
        for (name, kind) in [
            ("cni0", "bridge"),
            ("virbr0", "bridge"),
            ("br-4f2a9c", "bridge"),
            ("tailscale0", "tun"),
            ("zt3jnzs4cx", "tun"),
            ("tun0", "tun"),
            ("wg0", "wireguard"),
            ("flannel.1", "vxlan"),
            ("cilium_vxlan", "vxlan"),
            ("genev_sys_6081", "geneve"),
            ("tunl0", "ipip"),
            ("sit0", "sit"),
            ("gre1", "gre"),
        ] {
            assert!(
                matches!(
                    skipped_for(name, Some(kind), false, none),
                    Some(Skip::Kind { .. })
                ),
                "{name} ({kind})"
            );
        }
        // Names when the kind says nothing: veths of containers and pod networks.
        for name in [
            "veth1a2b3c",
            "cali12345",
            "lxc98765",
            "cilium_host",
            "kube-ipvs0",
            "docker0",
            "weave",
        ] {
            assert!(
                matches!(
                    skipped_for(name, Some("veth"), false, none),
                    Some(Skip::Name { .. })
                ),
                "{name}"
            );
        }
        // What carries paths: physical NICs (no kind), bonds, VLANs, macvlans, and veths
        // that are some host's own interface.
        for (name, kind) in [
            ("eth0", None),
            ("enp3s0", None),
            ("wlan0", None),
            ("bond0", Some("bond")),
            ("eth0.100", Some("vlan")),
            ("macvlan0", Some("macvlan")),
            ("eth0", Some("veth")),
            ("eth1", Some("veth")),
        ] {
            assert_eq!(
                skipped_for(name, kind, false, none),
                None,
                "{name} {kind:?}"
            );
        }
        // The default route's interface is never skipped by the defaults, whatever it is.
        for (name, kind) in [
            ("br0", Some("bridge")),
            ("vmbr0", Some("bridge")),
            ("veth0", Some("veth")),
            ("wg0", Some("wireguard")),
            ("docker0", Some("bridge")),
        ] {
            assert_eq!(skipped_for(name, kind, true, none), None, "uplink {name}");
        }
    }

    #[test]
    fn the_operators_list_comes_first() {
        // Deny patterns add to the defaults.
        let l = "!eth1,!br-*";
        assert_eq!(
            skipped_for("eth1", None, false, l),
            Some(Skip::Denied("!eth1".into()))
        );
        assert_eq!(skipped_for("eth0", None, false, l), None);
        assert!(matches!(
            skipped_for("docker0", Some("bridge"), false, l),
            Some(Skip::Kind { .. })
        ));
        // An explicit deny removes even the uplink.
        assert_eq!(
            skipped_for("eth0", None, true, "!eth0"),
            Some(Skip::Denied("!eth0".into()))
        );
        // Allow patterns: only those, whatever the defaults would say.
        let l = "eth0,ens*,br-lan";
        assert_eq!(skipped_for("eth0", None, false, l), None);
        assert_eq!(skipped_for("ens3", None, false, l), None);
        assert_eq!(skipped_for("br-lan", Some("bridge"), false, l), None);
        assert_eq!(skipped_for("eth1", None, false, l), Some(Skip::NotListed));
        assert_eq!(skipped_for("wlan0", None, true, l), Some(Skip::NotListed));
        // Deny wins over allow.
        assert_eq!(
            skipped_for("eth1", None, false, "eth*,!eth1"),
            Some(Skip::Denied("!eth1".into()))
        );
        assert_eq!(skipped_for("eth2", None, false, "eth*,!eth1"), None);
    }

    #[test]
    fn reasons_read_well() {
        let s = skipped_for("kube-ipvs0", Some("dummy"), false, "").unwrap();
        assert!(s.to_string().starts_with("link kind dummy: "), "{s}");
        let s = skipped_for("eth1", None, false, "!eth1").unwrap();
        assert_eq!(
            s.to_string(),
            "denied by the endpoint interface list (!eth1)"
        );
        let s = skipped_for("veth12", Some("veth"), false, "").unwrap();
        assert!(s.to_string().starts_with("name matches veth*: "), "{s}");
    }

    /// The node of the issue: a LAN address on eth0, 60 ClusterIPs on kube-ipvs0, docker0.
    fn kubernetes_node() -> Vec<LocalAddress> {
        let mut v = vec![addr([198, 51, 100, 10], "eth0", Some("veth"), true)];
        for i in 0..60u8 {
            v.push(addr(
                [10, 96, i / 16, i],
                "kube-ipvs0",
                Some("dummy"),
                false,
            ));
        }
        v.push(addr([172, 17, 0, 1], "docker0", Some("bridge"), false));
        v
    }

    #[test]
    fn a_kubernetes_node_reports_its_lan_address_alone() {
        let r = report(&kubernetes_node(), &list(""), 51820, relays(&[], None));
        assert_eq!(r, vec![SocketAddr::from(([198, 51, 100, 10], 51820))]);
        let skipped = skipped(&kubernetes_node(), &list(""));
        let names: Vec<(&str, usize)> = skipped
            .iter()
            .map(|s| (s.interface.as_str(), s.addresses))
            .collect();
        assert_eq!(names, [("kube-ipvs0", 60), ("docker0", 1)]);
    }

    #[test]
    fn uplinks_come_first() {
        let local = vec![
            addr([192, 0, 2, 5], "eth1", None, false),
            addr([198, 51, 100, 10], "eth0", None, true),
            addr([192, 0, 2, 6], "eth2", None, false),
        ];
        let r = report(&local, &list(""), 7, relays(&[], None));
        let ips: Vec<String> = r.iter().map(|e| e.ip().to_string()).collect();
        assert_eq!(ips, ["198.51.100.10", "192.0.2.5", "192.0.2.6"]);
    }

    #[test]
    fn relay_mappings_are_never_crowded_out() {
        // 40 usable local addresses, three relays (two see the same mapping, one sees what
        // the controller sees).
        let local: Vec<LocalAddress> = (0..40u8)
            .map(|i| addr([192, 0, 2, i + 1], "eth0", None, true))
            .collect();
        let ctl = SocketAddr::from(([203, 0, 113, 100], 51820));
        let m1 = SocketAddr::from(([203, 0, 113, 100], 40001));
        let m2 = SocketAddr::from(([203, 0, 113, 100], 40002));
        let r = report(
            &local,
            &list(""),
            51820,
            relays(&[m1, ctl, m2, m1], Some(ctl)),
        );
        assert_eq!(r.len(), REPORTED);
        assert_eq!(&r[REPORTED - 2..], &[m1, m2]);
        assert!(
            !r.contains(&ctl),
            "the controller's own observation is its to add"
        );
        assert_eq!(r.iter().filter(|e| e.port() == 51820).count(), REPORTED - 2);
        // More mappings than places: the mappings keep them all.
        let many: Vec<SocketAddr> = (0..20u16)
            .map(|p| SocketAddr::from(([203, 0, 113, 100], 50000 + p)))
            .collect();
        let r = report(&local, &list(""), 51820, relays(&many, None));
        assert_eq!(r, many[..REPORTED]);
        // Without relays, local addresses fill every place.
        let r = report(&local, &list(""), 51820, relays(&[], Some(ctl)));
        assert_eq!(r.len(), REPORTED);
    }

    #[test]
    fn a_public_address_that_is_also_a_mapping_counts_once() {
        let local = vec![addr([203, 0, 113, 10], "eth0", None, true)];
        let m = SocketAddr::from(([203, 0, 113, 10], 51820));
        assert_eq!(
            report(&local, &list(""), 51820, relays(&[m], None)),
            vec![m]
        );
    }

    #[test]
    fn the_routers_mapping_is_never_crowded_out() {
        let local: Vec<LocalAddress> = (0..40u8)
            .map(|i| addr([192, 0, 2, i + 1], "eth0", None, true))
            .collect();
        let router = SocketAddr::from(([203, 0, 113, 100], 51820));
        let ctl = SocketAddr::from(([203, 0, 113, 100], 40000));
        let many: Vec<SocketAddr> = (0..20u16)
            .map(|p| SocketAddr::from(([203, 0, 113, 100], 50000 + p)))
            .collect();
        let with = |relays: &[SocketAddr], controller| {
            report(
                &local,
                &list(""),
                51820,
                Mappings {
                    router: Some(router),
                    relays,
                    controller,
                },
            )
        };
        // 40 local addresses: the router's mapping keeps its place, local addresses fill the
        // rest.
        let r = with(&[], Some(ctl));
        assert_eq!(r.len(), REPORTED);
        assert_eq!(r.last(), Some(&router));
        // More relay mappings than places: the router's comes first and stays.
        let r = with(&many, None);
        assert_eq!(r[0], router);
        assert_eq!(r[1..], many[..REPORTED - 1]);
        // Seen by a relay too, or by the controller: counted once, or left to the controller.
        let r = with(&[router, many[0]], None);
        assert_eq!(r.iter().filter(|e| **e == router).count(), 1);
        assert_eq!(&r[REPORTED - 2..], &[router, many[0]]);
        let r = report(
            &local,
            &list(""),
            51820,
            Mappings {
                router: Some(router),
                relays: &[],
                controller: Some(router),
            },
        );
        assert!(
            !r.contains(&router),
            "the controller puts its observation first itself"
        );
        // Without a router mapping nothing changes.
        assert_eq!(
            report(&local, &list(""), 51820, Mappings::default()),
            report(&local, &list(""), 51820, relays(&[], None))
        );
    }
}
