//! A small internet with NAT routers, on one machine, to test NAT traversal and relaying.
//!
//! ```text
//!                         "internet" 203.0.113.0/24 (a bridge in its own namespace)
//!   ctl 203.0.113.1   public hosts 203.0.113.10..99   router WANs 203.0.113.100..254
//!                                                      |
//!                      router (namespace; `wan` + `lan`, ip_forward=1, nftables NAT)
//!                                                      |
//!                         LAN 198.51.100.0/24 (its own bridge): router .1, hosts .10..
//! ```
//!
//! Every LAN is a separate L2 segment, so all of them reuse 198.51.100.0/24. A double NAT is a
//! CGNAT router whose inside segment is 192.0.2.0/24 (CGNAT at .1, routers behind it from .2)
//! with a home router behind it whose LAN is again 198.51.100.0/24. The mesh overlay range
//! 100.64.0.0/10 is never used here.
//!
//! # IPv6
//!
//! IPv6 is opt-in, per host and per site, and uses the documentation prefix 2001:db8::/32 only:
//!
//! ```text
//!   internet 2001:db8::/64 (the same bridge): ctl 2001:db8::1 ([`NatLab::controller_ipv6`]),
//!     public hosts 2001:db8::10.. ([`NatLab::add_public_host_with`]), router WANs 2001:db8::100..
//!   dual-stack router n ([`NatLab::add_dual_stack_router`]): routes its site 2001:db8:1:n::/64
//!     on `lan` (router 2001:db8:1:n::1), hosts 2001:db8:1:n::10.. ([`NatLab::add_host_behind_with`])
//! ```
//!
//! The last group of an IPv6 address spells the last octet of the IPv4 address it goes with
//! (203.0.113.10 and 2001:db8::10, 198.51.100.12 and 2001:db8:1:n::12). Every IPv6 node on the
//! internet has a route to every site's /64 via that site's router. There is no NAT for IPv6:
//! the router's `table inet filter` (see below) is a stateful IPv6 firewall as home routers have
//! one: `ct state established,related accept`, LAN → WAN accepted, everything else from the WAN
//! dropped. So two hosts of two sites reach each other only once both have sent (a punch).
//! [`Stack::V6Only`] hosts have no IPv4 at all (loopback aside). DAD is off in IPv6 namespaces
//! (`accept_dad=0`, addresses added `nodad`), so addresses are usable at once; a host behind a
//! router is ready when it pings its gateway. [`NatLab::add_temporary_address`] lets the kernel
//! add a privacy address (RFC 8981, flag `temporary`) beside the stable one;
//! [`Router::block_ipv6`] withdraws a site's IPv6 (the forward chain drops it);
//! [`NatLab::delay_ipv6`] sends IPv6 between some hosts through a box that delays it (this
//! kernel has no netem).
//!
//! # NAT kinds
//!
//! Each router has an nftables ruleset (`table ip nat` + `table inet filter`), see
//! [`NatKind`]. Common to all kinds:
//! - LAN → WAN is forwarded; WAN → LAN only for conntrack-established flows (and, for
//!   [`NatKind::FullCone`], for flows its mapping table DNATs in).
//! - Unsolicited UDP to the router's own WAN address is dropped in `input`. That keeps Linux
//!   from confirming a conntrack entry for it, which would otherwise make the NAT change the
//!   port of a later outbound flow to that peer (simultaneous open keeps working, as with a real
//!   home router). Except [`NatKind::Masquerade`], the plain Linux gateway, which has no input
//!   filter and so shows exactly that.
//! - No hairpinning: a LAN host cannot reach another LAN host via the router's public mapping.
//!
//! # Endpoint-independent mapping
//!
//! Linux `masquerade` keeps the source port only while the resulting 5-tuple is unique, so two
//! LAN hosts using the same port (every mesh agent uses 51820) would get per-destination
//! mappings. The EIM kinds therefore keep their mappings in two dynamic nftables maps
//! (`eim_out`: LAN ip.port → WAN ip.port, `eim_in`: WAN port → LAN ip.port, idle timeout
//! [`MAPPING_TIMEOUT_SECS`], refreshed by every packet of the mapping's flows):
//! - a flow from a LAN endpoint that already has a mapping is SNATed to that mapping;
//! - otherwise its source port is kept unless another endpoint holds it (then a random one);
//! - [`NatKind::FullCone`] also DNATs any inbound UDP to a mapped WAN port to its owner. This is
//!   a real (dynamic) full cone, so no static port forwarding is needed: whatever port an agent
//!   uses, once it has sent anything out it is reachable from anyone.
//!
//! # Routers that map ports
//!
//! [`NatLab::add_port_mapping_router`] makes a router of any kind that also runs Debian's
//! miniupnpd (UPnP IGD, NAT-PMP, PCP), as home routers do; its mappings are DNAT rules in the
//! router's own ruleset ([`PortMapper::mappings`]).
//!
//! # Using it with the daemons
//!
//! [`Controller`](crate::Controller) and [`Agent`](crate::Agent) take a [`Lab`] and a [`Host`]:
//! pass [`NatLab::lab`] (the lab's temp dir, state dirs and logs) and hosts made here.
//!
//! ```no_run
//! # use mesh_e2e::natlab::{NatKind, NatLab};
//! # use mesh_e2e::{Agent, Controller};
//! # fn main() -> anyhow::Result<()> {
//! let mut nat = NatLab::new("my-test")?;
//! let ctl = Controller::start(nat.lab(), &nat.controller_host())?; // 203.0.113.1:7443
//! ctl.create_network("n")?;
//! let token = ctl.create_token("n", &["--reusable"])?;
//! let pub_host = nat.add_public_host("pub")?; // 203.0.113.10
//! let home = nat.add_router("home", NatKind::PortRestricted)?; // WAN 203.0.113.100
//! let a_host = nat.add_host_behind(&home, "a")?; // 198.51.100.10
//! let a = Agent::join(nat.lab(), &a_host, "a", &token)?;
//! let p = Agent::join(nat.lab(), &pub_host, "pub", &token)?;
//! # Ok(()) }
//! ```
//!
//! Drop order: drop the daemons before the `NatLab` (declare them after it). Dropping the
//! `NatLab` kills whatever still runs in its namespaces, deletes them, and, if the thread is
//! panicking, prints every router's ruleset (with counters and live mappings) and the logs.

use crate::netns::{ip, Host, Lab, Netns};
use crate::process::{run, Output, Proc};
use crate::wait_until;
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

/// The "internet" subnet (TEST-NET-3), /24.
pub const INTERNET_PREFIX: [u8; 3] = [203, 0, 113];
/// Every NAT router's LAN subnet (TEST-NET-2), /24; each LAN is its own segment.
pub const LAN_PREFIX: [u8; 3] = [198, 51, 100];
/// A CGNAT's inside subnet (TEST-NET-1), /24.
pub const CGNAT_PREFIX: [u8; 3] = [192, 0, 2];
/// The controller/relay host on the internet.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Idle timeout of an endpoint-independent mapping in the EIM routers.
pub const MAPPING_TIMEOUT_SECS: u32 = 120;
/// How long an interface may take to come up.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// The UDP port of the STUN server that tells the first port-mapping router its public
/// address (on the controller host; the next router's is one higher, and so on).
pub const PORT_MAPPER_STUN_PORT: u16 = 3479;
/// How long miniupnpd may take to start (its STUN check retries after 3 s without answers).
const PORT_MAPPER_READY: Duration = Duration::from_secs(15);
/// The internet's IPv6 /64 (inside the documentation prefix 2001:db8::/32), first four groups.
pub const INTERNET6_PREFIX: [u16; 4] = [0x2001, 0xdb8, 0, 0];
/// The controller/relay host's IPv6 address (once [`NatLab::controller_ipv6`] gave it one).
pub const CONTROLLER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// How long the kernel may take to add a temporary (privacy) address.
const TEMPADDR_TIMEOUT: Duration = Duration::from_secs(5);

/// The IPv6 site prefix (a /64) of the `n`th dual-stack router: 2001:db8:1:`n`::/64.
pub fn site_prefix(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, n, 0, 0, 0, 0)
}

/// Whether `ip` is inside the documentation prefix 2001:db8::/32.
pub fn is_documentation_v6(ip: &Ipv6Addr) -> bool {
    ip.segments()[..2] == [0x2001, 0xdb8]
}

/// The IPv6 group that reads like `octet` (10 → `::10`, 254 → `::254`), so that a host's IPv6
/// address ends like its IPv4 address.
fn group_of(octet: u8) -> u16 {
    let (h, t, o) = (
        u16::from(octet / 100),
        u16::from(octet / 10 % 10),
        u16::from(octet % 10),
    );
    h << 8 | t << 4 | o
}

/// Which address families a lab host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    /// IPv4 only (what the lab did before it knew IPv6).
    #[default]
    V4,
    /// IPv4 (NATed behind a router) and a global IPv6 address.
    DualStack,
    /// A global IPv6 address and no IPv4 at all (loopback aside): no IPv4 address, no route.
    V6Only,
}

impl Stack {
    fn has_v4(self) -> bool {
        self != Stack::V6Only
    }

    fn has_v6(self) -> bool {
        self != Stack::V4
    }
}

/// What a router does to UDP. (TCP and ICMP are masqueraded by all of them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering: once a LAN endpoint has sent anything out,
    /// anyone on the internet can reach it at its mapping.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering: only the exact
    /// ip:port a LAN endpoint sent to may answer.
    PortRestricted,
    /// Endpoint-dependent mapping (`snat to WAN:1024-65535 random`): another external port for
    /// every destination; replies only (conntrack).
    Symmetric,
    /// Like [`NatKind::PortRestricted`] for TCP, but the LAN may send UDP only to the controller
    /// (203.0.113.1 port 7443); any other UDP from the LAN is dropped.
    UdpBlocked,
    /// A plain Linux gateway as tutorials, minimal Debian routers and cloud NAT instances set
    /// it up: `masquerade` and a forward filter, but no input filter. Unsolicited UDP to its WAN
    /// address is accepted by the router itself (nothing listens, but conntrack confirms an
    /// entry for it), and masquerade keeps a source port only while the resulting 5-tuple is
    /// unique: a peer's first probe that arrives before our own outbound packet makes our later
    /// flow to that peer leave from another port.
    Masquerade,
}

/// A NAT router: its namespace has `wan` (upstream) and `lan` (its inside segment).
#[derive(Debug, Clone)]
pub struct Router {
    /// Name given at creation (also the name of its ruleset file).
    pub name: String,
    /// What kind of NAT it is.
    pub kind: NatKind,
    /// Its namespace.
    pub ns: String,
    /// Address of `wan`: 203.0.113.100+ on the internet, 192.0.2.2+ behind a CGNAT.
    pub wan_ip: Ipv4Addr,
    /// Address of `lan` (the gateway of its hosts): 198.51.100.1, or 192.0.2.1 for a CGNAT.
    pub lan_ip: Ipv4Addr,
    /// The address its hosts' traffic has on the internet (the outermost NAT's WAN address).
    pub public_ip: Ipv4Addr,
    /// IPv6 of a dual-stack router ([`NatLab::add_dual_stack_router`]).
    pub ip6: Option<RouterV6>,
    /// Index of its inside segment in the lab.
    segment: usize,
    /// Whether miniupnpd runs in it ([`NatLab::add_port_mapping_router`]).
    port_mapping: bool,
}

impl Router {
    /// Runs a one-shot command in the router's namespace (e.g. `nft list ruleset`).
    pub fn run<I, S>(&self, bin: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&self.ns, bin, args)
    }

    /// `nft list ruleset` of the router: rules with counters and the live EIM mappings.
    pub fn ruleset(&self) -> String {
        let out = self.run("nft", ["list", "ruleset"]);
        if out.success() {
            out.stdout
        } else {
            out.to_string()
        }
    }

    /// The router as a [`Host`] (its WAN address), e.g. to spawn something in it.
    pub fn as_host(&self) -> Host {
        Host {
            name: self.name.clone(),
            ns: self.ns.clone(),
            ip: self.wan_ip,
            ip6: self.ip6.map(|v| v.wan),
        }
    }

    /// Withdraws the site's IPv6 without telling its hosts, as an ISP outage or a broken
    /// firewall update would: the router stops forwarding IPv6 either way (a rule at the top
    /// of its forward chain drops it). The hosts keep their addresses and routes.
    pub fn block_ipv6(&self) -> Result<()> {
        self.run(
            "nft",
            [
                "insert", "rule", "inet", "filter", "forward", "meta", "nfproto", "ipv6",
                "counter", "drop",
            ],
        )
        .ok()
        .with_context(|| format!("blocking IPv6 in router {}", self.name))?;
        Ok(())
    }
}

/// The IPv6 side of a dual-stack router: routed, no NAT, a stateful firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterV6 {
    /// Its `wan` address on the internet: 2001:db8::100, ::101, ...
    pub wan: Ipv6Addr,
    /// The site's /64 on its `lan`: 2001:db8:1:n::/64.
    pub site: Ipv6Addr,
    /// Its `lan` address, its hosts' gateway: 2001:db8:1:n::1.
    pub lan: Ipv6Addr,
}

/// One L2 segment: a bridge `br0` in a switch namespace, with a /24.
#[derive(Debug)]
struct Segment {
    /// Namespace holding the bridge.
    switch: String,
    prefix: [u8; 3],
    /// The first four groups of its IPv6 /64, where it has one.
    prefix6: Option<[u16; 4]>,
    used: Vec<u8>,
    next_host: u8,
    last_host: u8,
    next_router: u8,
    last_router: u8,
}

impl Segment {
    fn addr(&self, octet: u8) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, octet)
    }

    /// The IPv6 address that goes with `octet`, if the segment has IPv6.
    fn addr6(&self, octet: u8) -> Option<Ipv6Addr> {
        let [a, b, c, d] = self.prefix6?;
        Some(Ipv6Addr::new(a, b, c, d, 0, 0, 0, group_of(octet)))
    }

    /// The next free octet in `next..=last`, advancing `next`.
    fn take(used: &mut Vec<u8>, next: &mut u8, last: u8) -> Option<u8> {
        while *next <= last {
            let o = *next;
            *next = next.saturating_add(1);
            if !used.contains(&o) {
                used.push(o);
                return Some(o);
            }
            if o == u8::MAX {
                break;
            }
        }
        None
    }

    fn take_host(&mut self) -> Option<u8> {
        Self::take(&mut self.used, &mut self.next_host, self.last_host)
    }

    fn take_router(&mut self) -> Option<u8> {
        Self::take(&mut self.used, &mut self.next_router, self.last_router)
    }
}

/// The NAT lab: an internet segment with the controller host, public hosts, NAT routers and
/// hosts behind them. See the module doc.
#[derive(Debug)]
pub struct NatLab {
    label: String,
    /// Segment 0 is the internet.
    segments: Vec<Segment>,
    routers: Vec<Router>,
    controller: Host,
    /// Every namespace of ours (switches, routers, hosts), deleted on drop.
    namespaces: Vec<Netns>,
    /// The core router's namespace, once a router sits behind it.
    core: Option<String>,
    /// Namespaces with IPv6 on the internet segment: each has a route to every site's /64.
    internet6: Vec<String>,
    /// Every site's /64 and the router it is routed via.
    sites6: Vec<(Ipv6Addr, Ipv6Addr)>,
    /// Temp dir, state dirs, logs; dropped last.
    lab: Lab,
}

impl NatLab {
    /// An internet segment with the controller host `ctl` (203.0.113.1) on it; `label` (the
    /// test name) names the temp dir.
    pub fn new(label: &str) -> Result<NatLab> {
        let lab = Lab::new(&format!("nat-{label}"))?;
        let mut nat = NatLab {
            label: label.to_string(),
            segments: Vec::new(),
            routers: Vec::new(),
            controller: Host {
                name: String::new(),
                ns: String::new(),
                ip: CONTROLLER_IP,
                ip6: None,
            },
            namespaces: Vec::new(),
            core: None,
            internet6: Vec::new(),
            sites6: Vec::new(),
            lab,
        };
        fs::create_dir_all(nat.nft_dir())
            .with_context(|| format!("creating {}", nat.nft_dir().display()))?;
        let internet = nat.add_segment(INTERNET_PREFIX, (10, 99), (100, 254))?;
        nat.segments[internet].prefix6 = Some(INTERNET6_PREFIX);
        nat.segments[internet].used.push(CONTROLLER_IP.octets()[3]);
        nat.controller =
            nat.add_host_on(internet, "ctl", CONTROLLER_IP.octets()[3], None, Stack::V4)?;
        Ok(nat)
    }

    /// The underlying [`Lab`]: temp dir, state dirs and log dir, for
    /// [`Controller`](crate::Controller) and [`Agent`](crate::Agent). (Its own 192.0.2.0/24
    /// switch stays empty: add hosts with the `NatLab` methods only.)
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The controller/relay host, 203.0.113.1 on the internet, named `ctl` (and 2001:db8::1
    /// once [`NatLab::controller_ipv6`] was called).
    pub fn controller_host(&self) -> Host {
        self.controller.clone()
    }

    /// Gives the controller host its IPv6 address 2001:db8::1 too (once; later calls only
    /// return it), with routes to every site.
    pub fn controller_ipv6(&mut self) -> Result<Ipv6Addr> {
        if self.controller.ip6.is_none() {
            let ns = self.controller.ns.clone();
            enable_ipv6(&ns, &["eth0"])?;
            add_addr6(&ns, "eth0", CONTROLLER_IP6)?;
            self.join_internet6(&ns)?;
            self.controller.ip6 = Some(CONTROLLER_IP6);
        }
        Ok(CONTROLLER_IP6)
    }

    /// The routers made so far.
    pub fn routers(&self) -> &[Router] {
        &self.routers
    }

    /// A host directly on the internet: 203.0.113.10, .11, ... (up to .99).
    pub fn add_public_host(&mut self, name: &str) -> Result<Host> {
        self.add_public_host_with(name, Stack::V4)
    }

    /// A host directly on the internet with the address families of `stack`: 203.0.113.10
    /// and/or 2001:db8::10, and so on (up to .99). IPv6 hosts get routes to every site.
    pub fn add_public_host_with(&mut self, name: &str, stack: Stack) -> Result<Host> {
        let octet = self.segments[0]
            .take_host()
            .ok_or_else(|| anyhow!("no public address left in lab {}", self.label))?;
        let host = self.add_host_on(0, name, octet, None, stack)?;
        if stack.has_v6() {
            self.join_internet6(&host.ns)?;
        }
        Ok(host)
    }

    /// A router like [`NatLab::add_router`] (IPv4 NAT of `kind`) that also routes IPv6: WAN
    /// 2001:db8::100, ::101, ... (the group reads like its IPv4 WAN's last octet), site
    /// 2001:db8:1:n::/64 on its LAN (n = 1 for the first dual-stack router, then 2, ...), no
    /// NAT for IPv6, its `inet` forward chain as the stateful IPv6 firewall (see the module
    /// doc; a [`NatKind::UdpBlocked`] one drops IPv6 UDP from its LAN too). Put hosts with
    /// IPv6 behind it with [`NatLab::add_host_behind_with`]. Sites behind the core router or a
    /// CGNAT have no IPv6 (yet).
    pub fn add_dual_stack_router(&mut self, name: &str, kind: NatKind) -> Result<Router> {
        let router = self.add_router_on(0, None, name, kind, LAN_PREFIX, false)?;
        let n = u16::try_from(self.sites6.len() + 1).unwrap_or(u16::MAX);
        let site = site_prefix(n);
        let s = site.segments();
        let wan_octet = router.wan_ip.octets()[3];
        let wan = self.segments[0]
            .addr6(wan_octet)
            .ok_or_else(|| anyhow!("the internet segment has no IPv6"))?;
        let lan = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1);
        let ns = router.ns.clone();
        enable_ipv6(&ns, &["wan", "lan"])?;
        run(&ns, "sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])
            .ok()
            .context("enabling IPv6 forwarding in a router")?;
        add_addr6(&ns, "wan", wan)?;
        add_addr6(&ns, "lan", lan)?;
        self.segments[router.segment].prefix6 = Some([s[0], s[1], s[2], s[3]]);
        self.join_internet6(&ns)?;
        for other in self.internet6.clone() {
            if other != ns {
                ip([
                    "-n",
                    &other,
                    "-6",
                    "route",
                    "add",
                    &format!("{site}/64"),
                    "via",
                    &wan.to_string(),
                ])?;
            }
        }
        self.sites6.push((site, wan));
        let v6 = RouterV6 { wan, site, lan };
        let mut router = router;
        router.ip6 = Some(v6);
        if let Some(r) = self.routers.iter_mut().find(|r| r.ns == ns) {
            r.ip6 = Some(v6);
        }
        Ok(router)
    }

    /// A NAT router on the internet (WAN 203.0.113.100, .101, ...) with its own LAN
    /// 198.51.100.0/24 behind it.
    pub fn add_router(&mut self, name: &str, kind: NatKind) -> Result<Router> {
        self.add_router_on(0, None, name, kind, LAN_PREFIX, false)
    }

    /// A NAT router on the internet one routed hop away from everything else, as sites are in
    /// the world: its WAN (203.0.113.100, .101, ...) sits on a segment of its own, joined to the
    /// internet segment by a core router that answers ARP on both sides (proxy ARP) and
    /// forwards, decrementing the TTL. Addresses stay as with [`NatLab::add_router`].
    pub fn add_router_via_core(&mut self, name: &str, kind: NatKind) -> Result<Router> {
        let core = match &self.core {
            Some(c) => c.clone(),
            None => {
                let octet = self.segments[0]
                    .take_router()
                    .ok_or_else(|| anyhow!("no router address left in lab {}", self.label))?;
                let ns = self.new_netns()?;
                self.attach(0, octet, &ns, "inet")?;
                for setting in ["net.ipv4.ip_forward=1", "net.ipv4.conf.inet.proxy_arp=1"] {
                    run(&ns, "sysctl", ["-qw", setting])
                        .ok()
                        .context("configuring the core router")?;
                }
                self.core = Some(ns.clone());
                ns
            }
        };
        let octet = self.segments[0]
            .take_router()
            .ok_or_else(|| anyhow!("no router address left in lab {}", self.label))?;
        // The site's own segment: the core's port and the router's WAN only.
        let site = self.add_segment(INTERNET_PREFIX, (1, 0), (octet, octet))?;
        let port = format!("c{octet}");
        let sw = self.segments[site].switch.clone();
        ip([
            "-n", &sw, "link", "add", "up0", "type", "veth", "peer", "name", &port, "netns", &core,
        ])?;
        ip(["-n", &sw, "link", "set", "up0", "master", "br0", "up"])?;
        ip(["-n", &core, "link", "set", &port, "up"])?;
        run(
            &core,
            "sysctl",
            ["-qw", &format!("net.ipv4.conf.{port}.proxy_arp=1")],
        )
        .ok()
        .context("configuring the core router")?;
        let wan = self.segments[0].addr(octet);
        ip([
            "-n",
            &core,
            "route",
            "add",
            &format!("{wan}/32"),
            "dev",
            &port,
        ])?;
        self.add_router_on(site, None, name, kind, LAN_PREFIX, false)
    }

    /// A NAT router whose WAN is inside `upstream` (192.0.2.2, .3, ... behind a CGNAT; default
    /// route via `upstream`), with its own LAN 198.51.100.0/24.
    pub fn add_router_behind(
        &mut self,
        upstream: &Router,
        name: &str,
        kind: NatKind,
    ) -> Result<Router> {
        let up = self.own_router(upstream)?;
        self.add_router_on(up.segment, Some(up), name, kind, LAN_PREFIX, false)
    }

    /// Double NAT: a CGNAT router `<name>-cgnat` on the internet (inside 192.0.2.0/24) and a
    /// home router `<name>-home` behind it (WAN 192.0.2.2, LAN 198.51.100.0/24), both
    /// [`NatKind::PortRestricted`]. Put hosts behind the home router.
    pub fn add_double_nat(&mut self, name: &str) -> Result<(Router, Router)> {
        self.add_double_nat_with(name, NatKind::PortRestricted, NatKind::PortRestricted)
    }

    /// [`NatLab::add_double_nat`] with other kinds for the CGNAT and the home router.
    pub fn add_double_nat_with(
        &mut self,
        name: &str,
        cgnat: NatKind,
        home: NatKind,
    ) -> Result<(Router, Router)> {
        let outer = self.add_router_on(
            0,
            None,
            &format!("{name}-cgnat"),
            cgnat,
            CGNAT_PREFIX,
            false,
        )?;
        let inner = self.add_router_on(
            outer.segment,
            Some(outer.clone()),
            &format!("{name}-home"),
            home,
            LAN_PREFIX,
            false,
        )?;
        Ok((outer, inner))
    }

    /// A NAT router on the internet like [`NatLab::add_router`] that maps ports on request, as
    /// most home routers do: Debian's miniupnpd (package `miniupnpd-nftables`) runs in it with
    /// UPnP IGD, NAT-PMP and PCP on its `lan`, `wan` as its external interface, in secure mode
    /// (a host may map ports to itself only). It fills chains of the router's ruleset, so its
    /// mappings show there (and in the ruleset printed when a test fails).
    ///
    /// miniupnpd refuses to map ports while its external address is a reserved one, which the
    /// lab's documentation addresses are; it is told its public address by STUN instead, for
    /// which `stun` (the `mesh-e2e-stun` helper) answers on the controller host at
    /// [`PORT_MAPPER_STUN_PORT`] and up. Returns once miniupnpd listens with port forwarding
    /// enabled. It stops when the [`PortMapper`] or the lab is dropped.
    pub fn add_port_mapping_router(
        &mut self,
        name: &str,
        kind: NatKind,
        stun: &Stun,
    ) -> Result<(Router, PortMapper)> {
        self.add_port_mapping_router_with(name, kind, stun, Speaks::All)
    }

    /// [`NatLab::add_port_mapping_router`] whose miniupnpd speaks only some of the protocols.
    pub fn add_port_mapping_router_with(
        &mut self,
        name: &str,
        kind: NatKind,
        stun: &Stun,
        speaks: Speaks,
    ) -> Result<(Router, PortMapper)> {
        self.start_port_mapper(name, kind, stun, speaks, MAX_LIFETIME)
    }

    /// [`NatLab::add_port_mapping_router`] whose miniupnpd grants PCP and NAT-PMP leases of at
    /// most `max_lease`, so that a test sees them renewed (miniupnpd's shortest lease is 120 s,
    /// and it refuses to start unless the longest is longer).
    pub fn add_port_mapping_router_with_lease(
        &mut self,
        name: &str,
        kind: NatKind,
        stun: &Stun,
        max_lease: Duration,
    ) -> Result<(Router, PortMapper)> {
        let secs = u32::try_from(max_lease.as_secs()).unwrap_or(MAX_LIFETIME);
        self.start_port_mapper(name, kind, stun, Speaks::All, secs)
    }

    fn start_port_mapper(
        &mut self,
        name: &str,
        kind: NatKind,
        stun: &Stun,
        speaks: Speaks,
        max_lifetime: u32,
    ) -> Result<(Router, PortMapper)> {
        let miniupnpd = ["/usr/sbin/miniupnpd", "/usr/local/sbin/miniupnpd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!("miniupnpd not found: install Debian's miniupnpd-nftables (test.sh does)")
            })?;
        let index = self.routers.iter().filter(|r| r.port_mapping).count();
        let mut router = self.add_router_on(0, None, name, kind, LAN_PREFIX, true)?;
        router.port_mapping = true;
        if let Some(r) = self.routers.last_mut() {
            r.port_mapping = true;
        }
        let stun_port = PORT_MAPPER_STUN_PORT + u16::try_from(index).unwrap_or(0);
        let ctl = self.controller_host();
        let stun_server = stun.stun(self, &ctl, stun_port)?;
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir = self.lab.dir().join(format!("miniupnpd-{safe}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("miniupnpd.conf");
        let [a, b, c] = LAN_PREFIX;
        let config = format!(
            "# miniupnpd of lab router {name} ({kind:?})\n\
             ext_ifname=wan\n\
             listening_ip=lan\n\
             http_port=5000\n\
             enable_upnp={upnp}\n\
             # NAT-PMP and PCP share this switch.\n\
             enable_natpmp={pmp}\n\
             secure_mode=yes\n\
             system_uptime=no\n\
             ext_perform_stun=yes\n\
             ext_stun_host={CONTROLLER_IP}\n\
             ext_stun_port={stun_port}\n\
             lease_file={leases}\n\
             uuid=6f9a3c1e-2b7d-4e58-9a41-0c5e8d7f{index:04x}\n\
             min_lifetime=120\n\
             max_lifetime={max_lifetime}\n\
             allow 1024-65535 {a}.{b}.{c}.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            leases = dir.join("leases").display(),
            upnp = if speaks == Speaks::PcpAndNatPmp {
                "no"
            } else {
                "yes"
            },
            pmp = if speaks == Speaks::Upnp { "no" } else { "yes" },
        );
        fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let pid_file = dir.join("miniupnpd.pid");
        // -d: in the foreground, logging to stderr; -P: its pid file here, not in /run.
        let args = [
            OsStr::new("-d"),
            OsStr::new("-f"),
            conf.as_os_str(),
            OsStr::new("-P"),
            pid_file.as_os_str(),
        ];
        let mut daemon = self.spawn(
            &router.as_host(),
            &format!("{name}-miniupnpd"),
            &miniupnpd,
            args,
        )?;
        let mut exited = false;
        // Its last start-up line: NAT-PMP/PCP's socket, else UPnP's HTTP port.
        let ready_line = if speaks == Speaks::Upnp {
            "HTTP listening on port"
        } else {
            "Listening for NAT-PMP/PCP traffic"
        };
        let listening = wait_until(PORT_MAPPER_READY, || {
            if daemon.stderr().contains(ready_line) {
                return true;
            }
            exited = !daemon.is_running();
            exited
        });
        let log = daemon.stderr();
        if !listening || exited || !log.contains("Port forwarding is now enabled") {
            let log = daemon.log();
            bail!(
                "miniupnpd in router {name} did not start with port forwarding enabled within \
                 {PORT_MAPPER_READY:?}:\n{log}"
            );
        }
        Ok((
            router.clone(),
            PortMapper {
                router,
                daemon,
                _stun: stun_server,
            },
        ))
    }

    /// A host on `router`'s inside segment: 198.51.100.10, .11, ... (192.0.2.10, ... behind a
    /// CGNAT), default route via the router.
    pub fn add_host_behind(&mut self, router: &Router, name: &str) -> Result<Host> {
        self.add_host_behind_with(router, name, Stack::V4)
    }

    /// A host on `router`'s inside segment with the address families of `stack`: IPv4 as
    /// with [`NatLab::add_host_behind`], IPv6 2001:db8:1:n::10, ::11, ... from the site's /64
    /// (the router must be a [`NatLab::add_dual_stack_router`]), default routes via the router.
    /// Returns once the host pings its gateway in each family it has.
    pub fn add_host_behind_with(
        &mut self,
        router: &Router,
        name: &str,
        stack: Stack,
    ) -> Result<Host> {
        let r = self.own_router(router)?;
        if stack.has_v6() && r.ip6.is_none() {
            bail!(
                "router {} has no IPv6: make it with add_dual_stack_router",
                r.name
            );
        }
        let octet = self.segments[r.segment]
            .take_host()
            .ok_or_else(|| anyhow!("no address left behind router {}", r.name))?;
        let host = self.add_host_on(r.segment, name, octet, Some(r.lan_ip), stack)?;
        if let (Some(v6), true) = (r.ip6, stack.has_v6()) {
            ip([
                "-n",
                &host.ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &v6.lan.to_string(),
            ])?;
            let pinger = host.clone();
            if !wait_until(LINK_TIMEOUT, || pinger.ping6(v6.lan)) {
                bail!(
                    "{name} ({}) cannot ping its IPv6 gateway {}",
                    host.ns,
                    v6.lan
                );
            }
        }
        Ok(host)
    }

    /// Sets the MTU of the link between `host` and `router`'s inside segment, on both ends (the
    /// bridge port and the host's `eth0`): a LAN that silently drops larger frames toward the
    /// host (a bridge neither fragments nor answers with ICMP). As [`Lab::set_link_mtu`], UDP GSO
    /// batches are segmented before these devices.
    pub fn set_link_mtu(&self, router: &Router, host: &Host, mtu: u32) -> Result<()> {
        let r = self.own_router(router)?;
        let octet = if host.ip.is_unspecified() {
            host.ip6
                .and_then(|a| format!("{:x}", a.segments()[7]).parse::<u8>().ok())
                .ok_or_else(|| anyhow!("{} has no lab address", host.name))?
        } else {
            host.ip.octets()[3]
        };
        let port = format!("v{octet}");
        let mtu = mtu.to_string();
        let sw = self.segments[r.segment].switch.as_str();
        for (ns, dev) in [(sw, port.as_str()), (host.ns.as_str(), "eth0")] {
            ip([
                "-n",
                ns,
                "link",
                "set",
                dev,
                "mtu",
                mtu.as_str(),
                "gso_max_segs",
                "1",
            ])?;
        }
        Ok(())
    }

    /// Lets the kernel give `host` a temporary (privacy) address beside its stable one, as
    /// `use_tempaddr=2` does with router advertisements: the stable address becomes the
    /// template (`mngtmpaddr`), and the kernel adds a random address of the same /64 with the
    /// flag `temporary`, preferred for outgoing connections. Returns that address once it is
    /// usable.
    pub fn add_temporary_address(&self, host: &Host) -> Result<Ipv6Addr> {
        let stable = host
            .ip6
            .ok_or_else(|| anyhow!("{} has no IPv6 address", host.name))?;
        run(
            &host.ns,
            "sysctl",
            ["-qw", "net.ipv6.conf.eth0.use_tempaddr=2"],
        )
        .ok()
        .context("enabling privacy addresses")?;
        ip([
            "-n",
            &host.ns,
            "addr",
            "change",
            &format!("{stable}/64"),
            "dev",
            "eth0",
            "nodad",
            "mngtmpaddr",
        ])?;
        let found = crate::wait_for(TEMPADDR_TIMEOUT, || {
            let out = ip([
                "-n",
                &host.ns,
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
                "temporary",
            ])
            .ok()?;
            out.lines()
                .filter(|l| !l.contains("tentative"))
                .find_map(|l| {
                    let word = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                    word.split('/').next()?.parse::<Ipv6Addr>().ok()
                })
        });
        found.ok_or_else(|| {
            anyhow!(
                "the kernel made no temporary address on {} within {TEMPADDR_TIMEOUT:?}",
                host.name
            )
        })
    }

    /// Sends the IPv6 packets that `hosts` (on the internet segment) send to each other
    /// through a box that holds each one `millis` ms (this kernel has no netem): a namespace on
    /// the internet with a TUN device served by `helper` (the `mesh-e2e-tundelay` binary), host
    /// routes to the others via the box. IPv4 and everything else keeps its path. Dropping the
    /// [`Ipv6Delay`] (or [`Ipv6Delay::remove`]) takes the routes away again.
    pub fn delay_ipv6(
        &mut self,
        helper: &std::path::Path,
        hosts: &[&Host],
        millis: u64,
    ) -> Result<Ipv6Delay> {
        let addrs: Vec<Ipv6Addr> = hosts
            .iter()
            .map(|h| {
                h.ip6
                    .filter(|a| a.segments()[..4] == INTERNET6_PREFIX)
                    .ok_or_else(|| anyhow!("{} has no IPv6 address on the internet", h.name))
            })
            .collect::<Result<_>>()?;
        let octet = self.segments[0]
            .take_host()
            .ok_or_else(|| anyhow!("no public address left in lab {}", self.label))?;
        let boxed = self.add_host_on(0, "v6delay", octet, None, Stack::V6Only)?;
        let box_ip = boxed
            .ip6
            .ok_or_else(|| anyhow!("the delay box has no IPv6"))?;
        run(
            &boxed.ns,
            "sysctl",
            ["-qw", "net.ipv6.conf.all.forwarding=1"],
        )
        .ok()
        .context("enabling IPv6 forwarding in the delay box")?;
        let mut proc = self.spawn(
            &boxed,
            "v6delay",
            helper,
            ["dly0".to_string(), millis.to_string()],
        )?;
        let mut exited = false;
        let ready = wait_until(LINK_TIMEOUT, || {
            if proc.stdout().lines().any(|l| l.starts_with("ready ")) {
                return true;
            }
            exited = !proc.is_running();
            exited
        });
        if !ready || exited {
            let log = proc.log();
            bail!("the IPv6 delay box did not start:\n{log}");
        }
        let ns = boxed.ns.as_str();
        ip(["-n", ns, "link", "set", "dly0", "up"])?;
        // In: to the delayed hosts via the TUN; out of the TUN: straight to the segment.
        for a in &addrs {
            ip([
                "-n",
                ns,
                "-6",
                "route",
                "add",
                &format!("{a}/128"),
                "dev",
                "dly0",
            ])?;
        }
        ip([
            "-n", ns, "-6", "rule", "add", "iif", "dly0", "lookup", "100",
        ])?;
        ip([
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "2001:db8::/64",
            "dev",
            "eth0",
            "table",
            "100",
        ])?;
        let mut routes = Vec::new();
        for (h, a) in hosts.iter().zip(&addrs) {
            for b in addrs.iter().filter(|b| *b != a) {
                ip([
                    "-n",
                    &h.ns,
                    "-6",
                    "route",
                    "add",
                    &format!("{b}/128"),
                    "via",
                    &box_ip.to_string(),
                ])?;
                routes.push((h.ns.clone(), *b));
            }
        }
        Ok(Ipv6Delay {
            routes,
            _proc: proc,
        })
    }

    /// Starts a daemon in `host`, logging into the lab's log dir (see [`Lab::spawn`]).
    pub fn spawn<I, S>(
        &self,
        host: &Host,
        label: &str,
        bin: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.lab.spawn(host, label, bin, args)
    }

    /// Names of every namespace of the lab (the `Lab`'s and ours).
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = self.lab.namespaces();
        v.extend(self.namespaces.iter().map(|n| n.name().to_string()));
        v
    }

    /// Every router's `nft list ruleset`, for failure messages.
    pub fn rulesets(&self) -> String {
        let mut s = String::new();
        for r in &self.routers {
            let _ = writeln!(
                s,
                "---- router {} ({:?}, {}, wan {}):\n{}",
                r.name,
                r.kind,
                r.ns,
                r.wan_ip,
                r.ruleset().trim_end()
            );
        }
        s
    }

    fn nft_dir(&self) -> PathBuf {
        self.lab.dir().join("nft")
    }

    /// The router as this lab knows it (so a `Router` of another lab is refused).
    fn own_router(&self, router: &Router) -> Result<Router> {
        self.routers
            .iter()
            .find(|r| r.ns == router.ns)
            .cloned()
            .ok_or_else(|| anyhow!("router {} is not part of lab {}", router.name, self.label))
    }

    fn new_netns(&mut self) -> Result<String> {
        let ns = Netns::new()?;
        let name = ns.name().to_string();
        self.namespaces.push(ns);
        Ok(name)
    }

    /// Adds namespace `ns` (IPv6 on the internet segment) to those that route to every site,
    /// with routes to the sites known so far.
    fn join_internet6(&mut self, ns: &str) -> Result<()> {
        for (site, via) in &self.sites6 {
            ip([
                "-n",
                ns,
                "-6",
                "route",
                "add",
                &format!("{site}/64"),
                "via",
                &via.to_string(),
            ])?;
        }
        self.internet6.push(ns.to_string());
        Ok(())
    }

    /// A new segment: a switch namespace with bridge `br0`.
    fn add_segment(
        &mut self,
        prefix: [u8; 3],
        hosts: (u8, u8),
        routers: (u8, u8),
    ) -> Result<usize> {
        let switch = self.new_netns()?;
        ip(["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(["-n", &switch, "link", "set", "br0", "up"])?;
        self.segments.push(Segment {
            switch,
            prefix,
            prefix6: None,
            used: Vec::new(),
            next_host: hosts.0,
            last_host: hosts.1,
            next_router: routers.0,
            last_router: routers.1,
        });
        Ok(self.segments.len() - 1)
    }

    /// Connects namespace `ns` to segment `seg` by a veth pair (`v<octet>` on the bridge,
    /// `ifname` in `ns`) and gives it address `<prefix>.<octet>/24`.
    fn attach(&self, seg: usize, octet: u8, ns: &str, ifname: &str) -> Result<Ipv4Addr> {
        self.attach_with(seg, octet, ns, ifname, true)
    }

    /// [`NatLab::attach`], with the IPv4 address only if `v4`.
    fn attach_with(
        &self,
        seg: usize,
        octet: u8,
        ns: &str,
        ifname: &str,
        v4: bool,
    ) -> Result<Ipv4Addr> {
        let segment = &self.segments[seg];
        let sw = segment.switch.as_str();
        let port = format!("v{octet}");
        let addr = segment.addr(octet);
        ip([
            "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
        ])?;
        ip(["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
        if v4 {
            ip([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ])?;
        }
        ip(["-n", ns, "link", "set", ifname, "up"])?;
        let up = wait_until(LINK_TIMEOUT, || {
            ip(["-n", ns, "-o", "link", "show", ifname]).is_ok_and(|s| s.contains("LOWER_UP"))
        });
        if !up {
            bail!("{ifname} of {ns} did not come up");
        }
        Ok(addr)
    }

    fn add_host_on(
        &mut self,
        seg: usize,
        name: &str,
        octet: u8,
        gateway: Option<Ipv4Addr>,
        stack: Stack,
    ) -> Result<Host> {
        let ns = self.new_netns()?;
        if stack.has_v6() {
            // Before the link exists, so that its link-local address skips DAD too.
            enable_ipv6(&ns, &[])?;
        }
        let addr = self.attach_with(seg, octet, &ns, "eth0", stack.has_v4())?;
        if let (Some(gw), true) = (gateway, stack.has_v4()) {
            ip(["-n", &ns, "route", "add", "default", "via", &gw.to_string()])?;
        }
        let ip6 = if stack.has_v6() {
            let a = self.segments[seg]
                .addr6(octet)
                .ok_or_else(|| anyhow!("segment of {name} has no IPv6"))?;
            add_addr6(&ns, "eth0", a)?;
            Some(a)
        } else {
            None
        };
        Ok(Host {
            name: name.to_string(),
            ns,
            ip: if stack.has_v4() {
                addr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            ip6,
        })
    }

    /// A router with `wan` on segment `up_seg` (default route via `upstream`'s LAN address if
    /// given) and a new inside segment `inside`/24 on `lan`.
    fn add_router_on(
        &mut self,
        up_seg: usize,
        upstream: Option<Router>,
        name: &str,
        kind: NatKind,
        inside: [u8; 3],
        port_mapping: bool,
    ) -> Result<Router> {
        if self.routers.iter().any(|r| r.name == name) {
            bail!("lab {} has a router named {name} already", self.label);
        }
        let wan_octet = self.segments[up_seg]
            .take_router()
            .ok_or_else(|| anyhow!("no router address left in lab {}", self.label))?;
        let ns = self.new_netns()?;
        // (DAD off in every router, in case it gets IPv6: its links must exist after this.)
        enable_ipv6(&ns, &[])?;
        let wan_ip = self.attach(up_seg, wan_octet, &ns, "wan")?;
        if let Some(up) = &upstream {
            ip([
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &up.lan_ip.to_string(),
            ])?;
        }
        let segment = self.add_segment(inside, (10, 254), (2, 9))?;
        self.segments[segment].used.push(1);
        let lan_ip = self.attach(segment, 1, &ns, "lan")?;
        run(&ns, "sysctl", ["-qw", "net.ipv4.ip_forward=1"])
            .ok()
            .context("enabling IPv4 forwarding in a router")?;
        let rules = ruleset(kind, wan_ip, port_mapping);
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let file = self.nft_dir().join(format!("{safe}.nft"));
        fs::write(&file, &rules).with_context(|| format!("writing {}", file.display()))?;
        run(&ns, "nft", [OsStr::new("-f"), file.as_os_str()])
            .ok()
            .with_context(|| {
                format!("loading the {kind:?} ruleset of router {name} (is nftables installed?)")
            })?;
        let router = Router {
            name: name.to_string(),
            kind,
            ns,
            wan_ip,
            lan_ip,
            public_ip: upstream.map_or(wan_ip, |u| u.public_ip),
            ip6: None,
            segment,
            port_mapping: false,
        };
        self.routers.push(router.clone());
        Ok(router)
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.routers.is_empty() {
            eprintln!(
                "======== routers of NAT lab {} ========\n{}======== end of routers ========",
                self.label,
                self.rulesets()
            );
        }
        // Kill what runs in our namespaces and delete them; then `lab` prints the logs (when
        // panicking) and removes the temp dir.
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

/// Turns off DAD in namespace `ns` (for links made later, and for `ifaces`, which exist), so
/// that IPv6 addresses are usable as soon as they are added.
fn enable_ipv6(ns: &str, ifaces: &[&str]) -> Result<()> {
    let mut settings = vec![
        "net.ipv6.conf.all.accept_dad=0".to_string(),
        "net.ipv6.conf.default.accept_dad=0".to_string(),
    ];
    settings.extend(
        ifaces
            .iter()
            .map(|i| format!("net.ipv6.conf.{i}.accept_dad=0")),
    );
    let mut args = vec!["-qw".to_string()];
    args.extend(settings);
    run(ns, "sysctl", &args)
        .ok()
        .context("turning off IPv6 DAD")?;
    Ok(())
}

/// Adds `addr`/64 to `ifname` in `ns` without DAD, and waits until it is usable (not
/// tentative).
fn add_addr6(ns: &str, ifname: &str, addr: Ipv6Addr) -> Result<()> {
    ip([
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        ifname,
        "nodad",
    ])?;
    let needle = format!(" {addr}/64 ");
    let usable = wait_until(LINK_TIMEOUT, || {
        ip(["-n", ns, "-6", "-o", "addr", "show", "dev", ifname]).is_ok_and(|s| {
            s.lines()
                .any(|l| l.contains(&needle) && !l.contains("tentative"))
        })
    });
    if !usable {
        bail!("{addr} on {ifname} of {ns} did not become usable");
    }
    Ok(())
}

/// IPv6 between some hosts held up by [`NatLab::delay_ipv6`]'s box, until dropped.
#[derive(Debug)]
pub struct Ipv6Delay {
    /// (namespace, destination) of each host route via the box.
    routes: Vec<(String, Ipv6Addr)>,
    _proc: Proc,
}

impl Ipv6Delay {
    /// Takes the hosts' routes via the box away: their IPv6 goes straight again.
    pub fn remove(&mut self) -> Result<()> {
        while let Some((ns, dst)) = self.routes.pop() {
            ip(["-n", &ns, "-6", "route", "del", &format!("{dst}/128")])?;
        }
        Ok(())
    }
}

impl Drop for Ipv6Delay {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// The nftables ruleset of a router of `kind` whose WAN address is `wan`. With `port_mapping`,
/// it also has what miniupnpd fills (see [`PortMapper`]): its chains in `table inet filter`
/// (miniupnpd's default table), hooked in, and the router's own traffic leaves from its own
/// address and ports (miniupnpd's STUN check of its public address needs that).
fn ruleset(kind: NatKind, wan: Ipv4Addr, port_mapping: bool) -> String {
    let eim = matches!(kind, NatKind::FullCone | NatKind::PortRestricted);
    let t = MAPPING_TIMEOUT_SECS;
    let mut s = String::from("table ip nat {\n");
    if eim {
        let _ = write!(
            s,
            "  map eim_out {{\n    type ipv4_addr . inet_service : ipv4_addr . inet_service\n    \
             flags dynamic,timeout\n    timeout {t}s\n  }}\n  map eim_in {{\n    type \
             inet_service : ipv4_addr . inet_service\n    flags dynamic,timeout\n    timeout \
             {t}s\n  }}\n"
        );
    }
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    if kind == NatKind::FullCone {
        // Endpoint-independent filtering: anything to a mapped port goes to its owner.
        s.push_str(
            "    iifname \"wan\" meta l4proto udp dnat ip addr . port to udp dport map @eim_in\n",
        );
    }
    s.push_str("  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    if port_mapping {
        let _ = writeln!(s, "    oifname \"wan\" ip saddr {wan} accept");
    }
    match kind {
        NatKind::FullCone | NatKind::PortRestricted => {
            let _ = write!(
                s,
                "    oifname \"wan\" meta l4proto udp snat ip addr . port to ip saddr . udp sport \
                 map @eim_out\n    oifname \"wan\" meta l4proto udp udp sport @eim_in snat ip to \
                 {wan}:1024-65535 random\n    oifname \"wan\" snat ip to {wan}\n"
            );
        }
        NatKind::Symmetric => {
            let _ = write!(
                s,
                "    oifname \"wan\" meta l4proto udp snat ip to {wan}:1024-65535 random\n    \
                 oifname \"wan\" snat ip to {wan}\n"
            );
        }
        NatKind::UdpBlocked | NatKind::Masquerade => s.push_str("    oifname \"wan\" masquerade\n"),
    }
    s.push_str("  }\n");
    if eim {
        // Runs after SNAT, so the reply tuple holds the mapping. Flows opened from the LAN
        // (original direction) and flows a full cone let in (reply direction) both refresh it.
        s.push_str(
            "  chain record {\n    type filter hook postrouting priority srcnat + 10; policy \
             accept;\n    oifname \"wan\" meta l4proto udp ct direction original update @eim_out \
             { ct original ip saddr . ct original proto-src : ct reply ip daddr . ct reply \
             proto-dst } update @eim_in { ct reply proto-dst : ct original ip saddr . ct \
             original proto-src }\n    oifname \"wan\" meta l4proto udp ct direction reply \
             update @eim_out { ct reply ip saddr . ct reply proto-src : ct original ip daddr . \
             ct original proto-dst } update @eim_in { ct original proto-dst : ct reply ip saddr \
             . ct reply proto-src }\n  }\n",
        );
    }
    s.push_str("}\n");
    s.push_str("table inet filter {\n");
    if port_mapping {
        // miniupnpd adds its DNAT rules to prerouting_miniupnpd, its accept rules to miniupnpd
        // (jumped to from forward below) and PCP PEER's SNAT rules to postrouting_miniupnpd.
        s.push_str(
            "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             jump prerouting_miniupnpd\n  }\n  chain postrouting {\n    type nat hook \
             postrouting priority srcnat; policy accept;\n    jump postrouting_miniupnpd\n  }\n  \
             chain prerouting_miniupnpd {\n  }\n  chain postrouting_miniupnpd {\n  }\n  chain \
             miniupnpd {\n  }\n",
        );
    }
    s.push_str("  chain input {\n    type filter hook input priority filter; policy accept;\n");
    if kind != NatKind::Masquerade {
        s.push_str("    iifname \"wan\" meta l4proto udp ct state new counter drop\n");
    }
    s.push_str(
        "  }\n  chain forward {\n    type filter hook forward priority filter; policy drop;\n    \
         ct state established,related accept\n",
    );
    if kind == NatKind::UdpBlocked {
        let _ = write!(
            s,
            "    iifname \"lan\" oifname \"wan\" ip daddr {CONTROLLER_IP} udp dport {} accept\n    \
             iifname \"lan\" meta l4proto udp counter drop\n",
            crate::CONTROL_PORT
        );
    }
    s.push_str("    iifname \"lan\" oifname \"wan\" accept\n");
    if kind == NatKind::FullCone {
        s.push_str("    iifname \"wan\" oifname \"lan\" ct status dnat accept\n");
    }
    if port_mapping {
        s.push_str("    jump miniupnpd\n");
    }
    s.push_str("    counter drop\n  }\n}\n");
    s
}

/// The `mesh-e2e-stun` helper (integration tests find it as
/// `env!("CARGO_BIN_EXE_mesh-e2e-stun")`): reflectors, probes, listeners and single datagrams,
/// to see what a NAT does.
#[derive(Debug, Clone)]
pub struct Stun {
    bin: PathBuf,
}

/// How long a started reflector or listener may take to bind.
const STUN_READY: Duration = Duration::from_secs(5);

impl Stun {
    /// The helper at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Stun {
        Stun { bin: bin.into() }
    }

    /// Starts a reflector on `host.ip:port` and waits until it is bound.
    pub fn serve(&self, nat: &NatLab, host: &Host, port: u16) -> Result<Proc> {
        let addr = SocketAddrV4::new(host.ip, port).to_string();
        let mut p = nat.spawn(
            host,
            &format!("{}-stun-{port}", host.name),
            &self.bin,
            ["serve", addr.as_str()],
        )?;
        wait_line(&mut p, "serving ")?;
        Ok(p)
    }

    /// From `host`'s UDP port `from`, asks each reflector in `servers` what it sees: the observed
    /// mapping per server, in order (`None`: no answer within 2 s).
    pub fn probe(
        &self,
        host: &Host,
        from: u16,
        servers: &[SocketAddrV4],
    ) -> Result<Vec<Option<SocketAddrV4>>> {
        let mut args = vec!["probe".to_string(), "--from".into(), from.to_string()];
        args.extend(servers.iter().map(|s| s.to_string()));
        let out = host.run(&self.bin, &args).ok()?;
        let mut seen = Vec::new();
        for server in servers {
            let prefix = format!("{server} ");
            let line = out
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .ok_or_else(|| anyhow!("probe printed nothing for {server}: {out}"))?;
            seen.push(match line.trim() {
                "none" => None,
                other => Some(
                    other
                        .parse()
                        .with_context(|| format!("bad mapping {other:?}: {out}"))?,
                ),
            });
        }
        Ok(seen)
    }

    /// Starts a listener on `host`'s UDP port `port` for `seconds`, after it sent one datagram
    /// to each of `punch`; waits until it is bound.
    pub fn listen(
        &self,
        nat: &NatLab,
        host: &Host,
        port: u16,
        seconds: u64,
        punch: &[SocketAddrV4],
    ) -> Result<Listener> {
        let mut args = vec!["listen".to_string(), port.to_string(), seconds.to_string()];
        for p in punch {
            args.push("--punch".into());
            args.push(p.to_string());
        }
        let mut proc = nat.spawn(
            host,
            &format!("{}-listen-{port}", host.name),
            &self.bin,
            args,
        )?;
        wait_line(&mut proc, "listening ")?;
        Ok(Listener { proc })
    }

    /// Starts a STUN server (binding requests only) on `host.ip:port` and waits until it is
    /// bound.
    pub fn stun(&self, nat: &NatLab, host: &Host, port: u16) -> Result<Proc> {
        let addr = SocketAddrV4::new(host.ip, port).to_string();
        let mut p = nat.spawn(
            host,
            &format!("{}-stun-server-{port}", host.name),
            &self.bin,
            ["stun", addr.as_str()],
        )?;
        wait_line(&mut p, "serving ")?;
        Ok(p)
    }

    /// Starts an IPv6 listener (`[::]:port`) on `host` for `seconds`, after it sent one
    /// datagram to each of `punch`; waits until it is bound. Its sources are
    /// [`Listener::sources_any`].
    pub fn listen6(
        &self,
        nat: &NatLab,
        host: &Host,
        port: u16,
        seconds: u64,
        punch: &[SocketAddr],
    ) -> Result<Listener> {
        let mut args = vec![
            "listen".to_string(),
            port.to_string(),
            seconds.to_string(),
            "--ipv6".into(),
        ];
        for p in punch {
            args.push("--punch".into());
            args.push(p.to_string());
        }
        let mut proc = nat.spawn(
            host,
            &format!("{}-listen6-{port}", host.name),
            &self.bin,
            args,
        )?;
        wait_line(&mut proc, "listening ")?;
        Ok(Listener { proc })
    }

    /// Sends one datagram from `host`'s UDP port `from` to `to`, of either family.
    pub fn send_any(&self, host: &Host, from: u16, to: SocketAddr) -> Result<()> {
        let args = [
            "send".to_string(),
            "--from".into(),
            from.to_string(),
            to.to_string(),
            format!("from-{}", host.name),
        ];
        host.run(&self.bin, args).ok()?;
        Ok(())
    }

    /// Sends one datagram from `host`'s UDP port `from` to `to`.
    pub fn send(&self, host: &Host, from: u16, to: SocketAddrV4) -> Result<()> {
        let args = [
            "send".to_string(),
            "--from".into(),
            from.to_string(),
            to.to_string(),
            format!("from-{}", host.name),
        ];
        host.run(&self.bin, args).ok()?;
        Ok(())
    }
}

/// Waits until `p` printed a line starting with `prefix`; fails early if it exits.
fn wait_line(p: &mut Proc, prefix: &str) -> Result<()> {
    let mut exited = false;
    let ready = wait_until(STUN_READY, || {
        if p.stdout().lines().any(|l| l.starts_with(prefix)) {
            return true;
        }
        exited = !p.is_running();
        exited
    });
    if ready && !exited {
        return Ok(());
    }
    let log = p.log();
    bail!("{} did not start:\n{log}", p.label())
}

/// A running `mesh-e2e-stun listen`.
#[derive(Debug)]
pub struct Listener {
    proc: Proc,
}

impl Listener {
    /// Sources of the datagrams received so far, in order.
    pub fn sources(&self) -> Vec<SocketAddrV4> {
        self.proc
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("from "))
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Waits until a datagram from `src` has arrived.
    pub fn wait_from(&self, src: SocketAddrV4, timeout: Duration) -> bool {
        wait_until(timeout, || self.sources().contains(&src))
    }

    /// Sources of the datagrams received so far, of either family, in order.
    pub fn sources_any(&self) -> Vec<SocketAddr> {
        self.proc
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("from "))
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Waits until a datagram from `src` (of either family) has arrived.
    pub fn wait_from_any(&self, src: SocketAddr, timeout: Duration) -> bool {
        wait_until(timeout, || self.sources_any().contains(&src))
    }

    /// The process (its log, or to stop it early).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// The longest PCP / NAT-PMP lease a lab router's miniupnpd grants unless a test says otherwise.
const MAX_LIFETIME: u32 = 86_400;

/// The port mapping protocols a lab router's miniupnpd speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// UPnP IGD, NAT-PMP and PCP.
    All,
    /// UPnP IGD only.
    Upnp,
    /// PCP and NAT-PMP only (miniupnpd has one switch for both).
    PcpAndNatPmp,
}

/// miniupnpd running in a lab router ([`NatLab::add_port_mapping_router`]), with the STUN
/// server that told it its public address. Dropping it stops both.
#[derive(Debug)]
pub struct PortMapper {
    router: Router,
    daemon: Proc,
    _stun: Proc,
}

/// One port mapping miniupnpd holds: a DNAT rule it put in the router's ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// `udp` or `tcp`.
    pub protocol: String,
    /// The port on the router's WAN address.
    pub external_port: u16,
    /// Where it forwards to.
    pub internal: SocketAddrV4,
}

impl PortMapper {
    /// The router it runs in.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The mappings it holds now, from its DNAT rules in the router's ruleset (chain
    /// `prerouting_miniupnpd`); an error if the chain cannot be read.
    pub fn mappings(&self) -> Result<Vec<Mapping>> {
        let out = self
            .router
            .run(
                "nft",
                ["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
            )
            .ok()?;
        Ok(out.stdout.lines().filter_map(parse_dnat_rule).collect())
    }

    /// miniupnpd's log so far (and whether it runs), for failure messages.
    pub fn log(&mut self) -> String {
        self.daemon.log()
    }
}

/// A mapping from one line of `nft list chain` output, if it is a DNAT rule of miniupnpd's.
/// miniupnpd writes raw payload matches, which nftables 1.0 prints as
/// `iif "wan" @nh,72,8 0x11 th dport 51820 dnat ip to 198.51.100.10:51820` (`@nh,72,8` is the
/// IPv4 protocol byte: 0x11 UDP, 0x6 TCP); other versions may spell the protocol as `udp` or
/// `meta l4proto udp`.
fn parse_dnat_rule(line: &str) -> Option<Mapping> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let dnat = words.iter().position(|w| *w == "dnat")?;
    let to = words[dnat..].iter().position(|w| *w == "to")? + dnat;
    let internal: SocketAddrV4 = words.get(to + 1)?.parse().ok()?;
    let matches = &words[..dnat];
    let dport = matches.iter().position(|w| *w == "dport")?;
    let external_port: u16 = matches.get(dport + 1)?.parse().ok()?;
    let protocol_byte = matches
        .iter()
        .position(|w| *w == "@nh,72,8")
        .and_then(|i| matches.get(i + 1));
    let protocol = match protocol_byte {
        Some(&"0x11") => "udp",
        Some(&"0x6" | &"0x06") => "tcp",
        Some(_) => return None,
        None if matches.contains(&"tcp") => "tcp",
        None => "udp",
    };
    Some(Mapping {
        protocol: protocol.to_string(),
        external_port,
        internal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miniupnpds_dnat_rules_parse() {
        let udp = parse_dnat_rule(
            "\t\tiif \"wan\" @nh,72,8 0x11 th dport 51820 dnat ip to 198.51.100.10:51820",
        );
        assert_eq!(
            udp,
            Some(Mapping {
                protocol: "udp".into(),
                external_port: 51820,
                internal: "198.51.100.10:51820".parse().unwrap(),
            })
        );
        let tcp =
            parse_dnat_rule("iif \"wan\" @nh,72,8 0x6 th dport 8080 dnat ip to 198.51.100.11:80");
        assert_eq!(
            tcp.map(|m| (m.protocol, m.external_port)),
            Some(("tcp".into(), 8080))
        );
        let spelled = parse_dnat_rule("iif \"wan\" udp dport 4000 dnat ip to 198.51.100.12:4001");
        assert_eq!(spelled.map(|m| m.internal.port()), Some(4001));
        // Not a DNAT rule: miniupnpd's accept rules in its filter chain.
        assert_eq!(
            parse_dnat_rule(
                "iif \"wan\" th dport 51820 @nh,128,32 0xc633640a @nh,72,8 0x11 accept"
            ),
            None
        );
    }
}
