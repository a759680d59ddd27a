//! Interface configuration through rtnetlink: MTU, link up, address, route; local addresses.

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Could not open the netlink socket.
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[from] std::io::Error),
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NoLink(String),
    /// IPv6 could not be turned on for the interface (for an IPv6 overlay address).
    #[error("cannot enable IPv6 on {link} ({source}); is IPv6 disabled on this host (ipv6.disable=1 or net.ipv6.conf.all.disable_ipv6=1)? The overlay works over IPv4 alone meanwhile; enable IPv6 for the IPv6 overlay address")]
    Ipv6 {
        /// Interface.
        link: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused a request.
    #[error("{what} on {link}: {source}")]
    Request {
        /// What was being done.
        what: &'static str,
        /// Interface.
        link: String,
        /// Kernel answer.
        source: rtnetlink::Error,
    },
}

/// How the overlay interface should look.
#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// Interface name (`mesh0`).
    pub name: String,
    /// The node's overlay address.
    pub address: Ipv4Addr,
    /// Prefix length of the overlay network; the network's route points at the interface.
    pub prefix_len: u8,
    /// The node's IPv6 overlay address and the prefix length of the network's IPv6 overlay
    /// (the kernel routes the prefix to the interface); `None`: IPv4 only.
    pub address6: Option<(Ipv6Addr, u8)>,
    /// MTU.
    pub mtu: u32,
}

pub(crate) fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_eexist())
}

const fn libc_eexist() -> i32 {
    17
}

pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        _ => Err(NetlinkError::NoLink(name.to_owned())),
    }
}

/// Sets MTU, brings the link up, adds the address with its prefix and makes sure the overlay
/// route points at the interface. Idempotent: what is already there stays (the IPv6 overlay
/// address `address6` included, which [`configure_ipv6`] adds).
pub async fn configure(cfg: &InterfaceConfig) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let index = link_index(&handle, &cfg.name).await?;
    let req = |what: &'static str| {
        let link = cfg.name.clone();
        move |source| NetlinkError::Request { what, link, source }
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(cfg.mtu).up().build())
        .execute()
        .await
        .map_err(req("setting MTU and link up"))?;
    // Remove addresses from an earlier run that are not ours any more.
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Ok(Some(msg)) = addrs.try_next().await {
        let ours = msg.attributes.iter().any(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => {
                *ip == cfg.address && msg.header.prefix_len == cfg.prefix_len
            }
            AddressAttribute::Address(IpAddr::V6(ip)) => {
                cfg.address6 == Some((*ip, msg.header.prefix_len))
            }
            _ => false,
        });
        if !ours {
            let _ = handle.address().del(msg).execute().await;
        }
    }
    match handle
        .address()
        .add(index, IpAddr::V4(cfg.address), cfg.prefix_len)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(e) if exists(&e) => {}
        Err(e) => return Err(req("adding address")(e)),
    }
    let network = Ipv4Addr::from(u32::from(cfg.address) & prefix_mask(cfg.prefix_len));
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network, cfg.prefix_len)
        .output_interface(index)
        .pref_source(cfg.address)
        .build();
    match handle.route().add(route).execute().await {
        Ok(()) => {}
        Err(e) if exists(&e) => {}
        Err(e) => return Err(req("adding route")(e)),
    }
    Ok(())
}

/// Puts the IPv6 overlay address `address6`/`len` on the interface `name` (after
/// [`configure`], which keeps it when it is there): turns IPv6 on for the device first (see
/// [`crate::tun::enable_ipv6`]). The kernel adds the route to the prefix with the address.
/// Fails on a host without IPv6; the caller goes on over IPv4.
pub async fn configure_ipv6(name: &str, address6: Ipv6Addr, len: u8) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let index = link_index(&handle, name).await?;
    crate::tun::enable_ipv6(name).map_err(|e| NetlinkError::Ipv6 {
        link: name.to_owned(),
        source: e,
    })?;
    match handle
        .address()
        .add(index, IpAddr::V6(address6), len)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(NetlinkError::Request {
            what: "adding IPv6 address",
            link: name.to_owned(),
            source: e,
        }),
    }
}

/// Netmask of a prefix length.
pub fn prefix_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

/// What the host's interfaces and routes say about the overlay: which of the node's addresses
/// may be offered to peers as endpoint candidates, and which destinations are reached only
/// through the overlay (and so may never be a peer's endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayView {
    /// Local addresses of both families that are not on the overlay interface, on an interface
    /// stacked on it, or inside a destination routed through them; not loopback, link-local,
    /// or (IPv6) tentative, deprecated or failed duplicate detection. Each comes with its
    /// interface, so that the caller can apply its own policy (which kinds of interface carry
    /// a path) on top.
    pub candidates: Vec<LocalAddress>,
    /// Destinations reached through the overlay: the overlay range, the addresses and routes of
    /// the overlay interface and of every interface stacked on it, plus this host's own
    /// addresses as host prefixes (a peer is never at one of them).
    pub excluded: Vec<IpNet>,
    /// Names of the interfaces found stacked on the overlay interface (for logs and status).
    pub stacked: Vec<String>,
}

/// A local address outside the overlay, with what the kernel says about its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddress {
    /// The address.
    pub address: IpAddr,
    /// An IPv6 temporary (privacy) address: it changes within a day, so stable ones come first.
    pub temporary: bool,
    /// Name of the interface that holds it.
    pub interface: String,
    /// The interface's link kind (`IFLA_INFO_KIND`: `bridge`, `dummy`, `veth`, `vlan`,
    /// `wireguard`, ...), `None` for a physical NIC.
    pub kind: Option<String>,
    /// Whether a default route of the main routing table leaves through the interface: it is
    /// the host's uplink.
    pub uplink: bool,
}

/// Reads links, addresses and routes and works out the [`OverlayView`] of overlay interface
/// `overlay_if` with overlay range `overlay` (`None` before the node knows it: while joining). An interface is stacked on the overlay when its
/// lower link (`IFLA_LINK`, a vxlan's `dev`) is the overlay interface or stacked itself, when a
/// vxlan's local address is inside the overlay range, or when it is a bridge with a stacked port.
pub async fn overlay_view(
    overlay_if: &str,
    overlay: Option<Ipv4Net>,
) -> Result<OverlayView, NetlinkError> {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo};
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let handle = connect()?;
    let overlay_index = link_index(&handle, overlay_if).await.ok();

    // Links: index -> (name, kind, lower links and bridge master, vxlan local address).
    struct Link {
        name: String,
        kind: Option<String>,
        lower: Vec<u32>,
        master: Option<u32>,
        local_in_overlay: bool,
    }
    let mut links: HashMap<u32, Link> = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Ok(Some(msg)) = dump.try_next().await {
        let mut link = Link {
            name: String::new(),
            kind: None,
            lower: Vec::new(),
            master: None,
            local_in_overlay: false,
        };
        // A lower link in another namespace (a veth's peer, a device moved into a container)
        // has an index that means nothing here, however much it looks like the overlay's.
        let foreign = msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Link(i) if !foreign => link.lower.push(*i),
                LinkAttribute::Controller(i) => link.master = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                        if let LinkInfo::Data(InfoData::Vxlan(vx)) = info {
                            for v in vx {
                                match v {
                                    InfoVxlan::Link(i) if !foreign => link.lower.push(*i),
                                    InfoVxlan::Local(ip) => {
                                        link.local_in_overlay |=
                                            overlay.is_some_and(|o| o.contains(ip))
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        links.insert(msg.header.index, link);
    }
    // Stacked links, to a fixpoint (a bridge of vxlan ports, a vlan on a stacked vxlan ...).
    let mut stacked: BTreeSet<u32> = overlay_index.into_iter().collect();
    loop {
        let before = stacked.len();
        for (index, link) in &links {
            let on_stacked = link.local_in_overlay
                || link.lower.iter().any(|l| stacked.contains(l) && l != index);
            if on_stacked {
                stacked.insert(*index);
            }
            if let Some(master) = link.master {
                if stacked.contains(index) && links.contains_key(&master) {
                    stacked.insert(master);
                }
            }
        }
        if stacked.len() == before {
            break;
        }
    }

    let mut excluded: Vec<IpNet> = overlay.iter().map(|o| IpNet::V4(o.trunc())).collect();
    let push = |net: IpNet, excluded: &mut Vec<IpNet>| {
        if net.prefix_len() > 0 && !excluded.contains(&net) {
            excluded.push(net);
        }
    };
    // Every route (any table, both families) that leaves through a stacked interface. Default
    // routes are left out: a default route over the overlay would exclude the whole underlay.
    // Default routes of the main table name the uplinks (policy tables are left out: a VPN such
    // as wg-quick puts its own default route there).
    let mut uplinks: BTreeSet<u32> = BTreeSet::new();
    for msg in dump_routes(&handle).await {
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if is_main_default(&msg) {
            uplinks.extend(oif);
            for a in &msg.attributes {
                if let RouteAttribute::MultiPath(hops) = a {
                    uplinks.extend(hops.iter().map(|h| h.interface_index));
                }
            }
        }
        if !oif.is_some_and(|i| stacked.contains(&i)) {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        if let Some(dst) = dst {
            if let Ok(net) = IpNet::new(dst, msg.header.destination_prefix_length) {
                push(net.trunc(), &mut excluded);
            }
        }
    }
    // Addresses: those of stacked interfaces are excluded with their subnets; the others are
    // candidates unless a route through the overlay covers them.
    struct Own {
        ip: IpAddr,
        on_stacked: bool,
        index: u32,
        temporary: bool,
        unusable: bool,
    }
    let mut own: Vec<Own> = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Ok(Some(msg)) = addrs.try_next().await {
        use rtnetlink::packet_route::address::AddressFlags;
        let index = msg.header.index;
        let on_stacked = stacked.contains(&index);
        // The full flags when the kernel sends them, else the header's byte. IPv6's temporary
        // flag shares its bit with IPv4's "secondary".
        let flags = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())));
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                if on_stacked {
                    if let Ok(net) = IpNet::new(*ip, msg.header.prefix_len) {
                        push(net.trunc(), &mut excluded);
                    }
                }
                if !own.iter().any(|o| o.ip == *ip) {
                    let v6 = ip.is_ipv6();
                    own.push(Own {
                        ip: *ip,
                        on_stacked,
                        index,
                        temporary: v6 && flags.contains(AddressFlags::Secondary),
                        unusable: v6
                            && flags.intersects(
                                AddressFlags::Tentative
                                    | AddressFlags::Deprecated
                                    | AddressFlags::Dadfailed,
                            ),
                    });
                }
            }
        }
    }
    let mut candidates = Vec::new();
    for o in &own {
        push(IpNet::from(o.ip), &mut excluded);
        let usable = !o.on_stacked
            && !o.unusable
            && is_unicast_path(o.ip)
            && !excluded
                .iter()
                .any(|n| n.prefix_len() < n.max_prefix_len() && n.contains(&o.ip));
        if usable {
            let link = links.get(&o.index);
            candidates.push(LocalAddress {
                address: o.ip,
                temporary: o.temporary,
                interface: link.map(|l| l.name.clone()).unwrap_or_default(),
                kind: link.and_then(|l| l.kind.clone()),
                uplink: uplinks.contains(&o.index),
            });
        }
    }
    let mut names: Vec<String> = stacked
        .iter()
        .filter(|i| Some(**i) != overlay_index)
        .filter_map(|i| links.get(i).map(|l| l.name.clone()))
        .collect();
    names.sort();
    Ok(OverlayView {
        candidates,
        excluded,
        stacked: names,
    })
}

/// Whether a peer could reach this host at `ip`: not loopback, unspecified, link-local (IPv6
/// link-local addresses need a zone no peer knows), multicast or IPv4-mapped.
fn is_unicast_path(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified() && !v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && !link_local
                && v6.to_ipv4_mapped().is_none()
        }
    }
}

/// One IPv4 network this host reaches without the overlay's say: the destination of a route of
/// the main table, or the subnet of an address, with the interface it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNetwork {
    /// A route's destination, or an address with its prefix length.
    pub network: Ipv4Net,
    /// The interface the route leaves through, or that holds the address (empty if unknown).
    pub interface: String,
    /// Whether this is an address's subnet (`true`) or a route (`false`).
    pub address: bool,
}

/// Every route of the main table except default routes, and the subnet of every IPv4 address
/// except loopback, each with its interface name. Needs no privilege.
pub async fn local_networks() -> Result<Vec<LocalNetwork>, NetlinkError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    let handle = connect()?;
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut links = handle.link().get().execute();
    while let Ok(Some(msg)) = links.try_next().await {
        for a in &msg.attributes {
            if let LinkAttribute::IfName(n) = a {
                names.insert(msg.header.index, n.clone());
            }
        }
    }
    let name_of = |i: Option<u32>| i.and_then(|i| names.get(&i).cloned()).unwrap_or_default();
    let mut out: Vec<LocalNetwork> = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Ok(Some(msg)) = routes.try_next().await {
        let table = table_of(&msg);
        if table != u32::from(RouteHeader::RT_TABLE_MAIN)
            || msg.header.destination_prefix_length == 0
        {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if let Some(net) =
            dst.and_then(|d| Ipv4Net::new(d, msg.header.destination_prefix_length).ok())
        {
            out.push(LocalNetwork {
                network: net.trunc(),
                interface: name_of(oif),
                address: false,
            });
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Ok(Some(msg)) = addrs.try_next().await {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                if ip.is_loopback() {
                    continue;
                }
                if let Ok(net) = Ipv4Net::new(*ip, msg.header.prefix_len) {
                    out.push(LocalNetwork {
                        network: net,
                        interface: name_of(Some(msg.header.index)),
                        address: true,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Whether interface `name` exists and carries `address`.
pub async fn has_address(name: &str, address: Ipv4Addr) -> Result<bool, NetlinkError> {
    let handle = connect()?;
    let Ok(index) = link_index(&handle, name).await else {
        return Ok(false);
    };
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Ok(Some(msg)) = addrs.try_next().await {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == address))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `msg` is a default route of the main table (policy tables are not: a VPN such as
/// wg-quick puts its own default route there). The table is the attribute when there is one
/// (tables above 255), else the header's.
/// Every route of both families, of every table: one dump after the other, as the kernel
/// refuses a second dump on a socket while one runs. A dump that fails ends with what it had.
pub(crate) async fn dump_routes(
    handle: &Handle,
) -> Vec<rtnetlink::packet_route::route::RouteMessage> {
    let mut all = Vec::new();
    for request in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(request).execute();
        while let Ok(Some(msg)) = routes.try_next().await {
            all.push(msg);
        }
    }
    all
}

fn is_main_default(msg: &rtnetlink::packet_route::route::RouteMessage) -> bool {
    use rtnetlink::packet_route::route::RouteHeader;
    msg.header.destination_prefix_length == 0
        && table_of(msg) == u32::from(RouteHeader::RT_TABLE_MAIN)
}

/// The routing table a route is in: the attribute when there is one (tables above 255), else
/// the header's.
pub(crate) fn table_of(msg: &rtnetlink::packet_route::route::RouteMessage) -> u32 {
    use rtnetlink::packet_route::route::RouteAttribute;
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The IPv4 gateway of the main table's default route (the one with the lowest metric when
/// there are several), or `None` when the host has no default route through a gateway (a host
/// on a public segment, a point-to-point uplink). The router that port mapping asks.
pub async fn default_gateway() -> Result<Option<Ipv4Addr>, NetlinkError> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let handle = connect()?;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Ok(Some(msg)) = routes.try_next().await {
        if !is_main_default(&msg) {
            continue;
        }
        let gateway = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let metric = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(0);
        if let Some(gw) = gateway {
            if best.is_none_or(|(m, _)| metric < m) {
                best = Some((metric, gw));
            }
        }
    }
    Ok(best.map(|(_, gw)| gw))
}

/// Deletes interface `name` if it exists (the persistent TUN device after `mesh leave`).
pub async fn delete_link(name: &str) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let Ok(index) = link_index(&handle, name).await else {
        return Ok(());
    };
    handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|source| NetlinkError::Request {
            what: "deleting link",
            link: name.to_owned(),
            source,
        })
}

/// Sets (`Some`) or removes (`None`) a host route to a peer's overlay address on the interface
/// with its own MTU: the kernel then sizes TCP segments and answers oversized packets for that
/// peer with "fragmentation needed", and `rt mtu` MSS clamping follows it.
pub async fn set_peer_mtu(
    interface: &str,
    peer: Ipv4Addr,
    source: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_route::route::RouteMetric;
    let what = ("setting a peer route MTU", "removing a peer route MTU");
    let metrics = mtu.map(|mtu| vec![RouteMetric::Mtu(mtu)]);
    replace_route(interface, Ipv4Net::from(peer), source, metrics, what).await
}

/// [`set_peer_mtu`] for a peer's IPv6 overlay address: a /128 route on the interface with its
/// own MTU (`None`: removed), so that the kernel answers oversized IPv6 packets for that peer
/// with "packet too big" and sizes TCP segments to fit.
pub async fn set_peer_mtu6(
    interface: &str,
    peer: std::net::Ipv6Addr,
    mtu: Option<u32>,
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_route::route::RouteMetric;
    let handle = connect()?;
    let index = link_index(&handle, interface).await?;
    let route = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(peer, 128)
        .output_interface(index)
        .build();
    let metrics = mtu.map(|mtu| vec![RouteMetric::Mtu(mtu)]);
    let what = (
        "setting a peer route MTU (IPv6)",
        "removing a peer route MTU (IPv6)",
    );
    put_route(&handle, interface, route, metrics, what).await
}

/// Adds (`present`) or removes a route to `prefix` (either family) through `interface`, with
/// `source` as the preferred source address (the node's overlay address of that family, when
/// it has one): a peer's approved subnet route.
pub async fn set_route(
    interface: &str,
    prefix: IpNet,
    source: Option<IpAddr>,
    present: bool,
) -> Result<(), NetlinkError> {
    let what = ("adding a subnet route", "removing a subnet route");
    let metrics = present.then(Vec::new);
    let handle = connect()?;
    let index = link_index(&handle, interface).await?;
    let route = match prefix {
        IpNet::V4(prefix) => {
            let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(prefix.network(), prefix.prefix_len())
                .output_interface(index);
            if let Some(IpAddr::V4(source)) = source {
                builder = builder.pref_source(source);
            }
            builder.build()
        }
        IpNet::V6(prefix) => {
            let mut builder = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(prefix.network(), prefix.prefix_len())
                .output_interface(index);
            if let Some(IpAddr::V6(source)) = source {
                builder = builder.pref_source(source);
            }
            builder.build()
        }
    };
    put_route(&handle, interface, route, metrics, what).await
}

/// Puts the main-table route to `prefix` through `interface` (preferred source `source`) in
/// place with `metrics` (replacing one that is there), or removes it with `None`; removing a
/// route that is not there is no error. `what`: how a failure to add, and to remove, is told.
async fn replace_route(
    interface: &str,
    prefix: Ipv4Net,
    source: Ipv4Addr,
    metrics: Option<Vec<rtnetlink::packet_route::route::RouteMetric>>,
    what: (&'static str, &'static str),
) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let index = link_index(&handle, interface).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(prefix.network(), prefix.prefix_len())
        .output_interface(index)
        .pref_source(source)
        .build();
    put_route(&handle, interface, route, metrics, what).await
}

/// Puts `route` in place with `metrics` (replacing one that is there), or removes it with
/// `None`; removing a route that is not there is no error.
async fn put_route(
    handle: &rtnetlink::Handle,
    interface: &str,
    mut route: rtnetlink::packet_route::route::RouteMessage,
    metrics: Option<Vec<rtnetlink::packet_route::route::RouteMetric>>,
    what: (&'static str, &'static str),
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let req = |what: &'static str| {
        let link = interface.to_owned();
        move |source| NetlinkError::Request { what, link, source }
    };
    match metrics {
        Some(metrics) => {
            if !metrics.is_empty() {
                route.attributes.push(RouteAttribute::Metrics(metrics));
            }
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(req(what.0))
        }
        None => match handle.route().del(route).execute().await {
            Ok(()) => Ok(()),
            // ESRCH: there was no such route.
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -3 => Ok(()),
            Err(e) => Err(req(what.1)(e)),
        },
    }
}

/// The prefixes of both families routed through `interface` in the main table, other than
/// host routes (/32 and /128, the per-peer MTU routes) and `connected` (the overlay's own
/// subnets): the subnet routes a previous run of the agent installed.
pub async fn routes_via(interface: &str, connected: &[IpNet]) -> Result<Vec<IpNet>, NetlinkError> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let handle = connect()?;
    let index = link_index(&handle, interface).await?;
    let mut out = Vec::new();
    for msg in dump_routes(&handle).await {
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if oif != Some(index) || msg.header.table != 254 {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        let len = msg.header.destination_prefix_length;
        if let Some(net) = dst.and_then(|d| IpNet::new(d, len).ok()) {
            let net = net.trunc();
            let host = len == net.max_prefix_len();
            // The kernel's own IPv6 routes (link-local, multicast) are not subnet routes.
            let kernel = matches!(net, IpNet::V6(n)
                if n.network().segments()[0] & 0xffc0 == 0xfe80
                    || n.network().segments()[0] >> 8 == 0xff);
            if len > 0 && !host && !kernel && !connected.iter().any(|c| c.trunc() == net) {
                out.push(net);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::prefix_mask;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(16), 0xffff_0000);
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
