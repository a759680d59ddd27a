//! Interface configuration through rtnetlink: MTU, link up, address, route; local addresses.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Could not open the netlink socket.
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[from] std::io::Error),
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NoLink(String),
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
    /// MTU.
    pub mtu: u32,
}

fn connect() -> Result<Handle, NetlinkError> {
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

async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        _ => Err(NetlinkError::NoLink(name.to_owned())),
    }
}

/// Sets MTU, brings the link up, adds the address with its prefix and makes sure the overlay
/// route points at the interface. Idempotent: what is already there stays.
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
        let stale =
            msg.attributes.iter().any(
                |a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip != cfg.address),
            ) || msg.header.prefix_len != cfg.prefix_len;
        if stale {
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

/// Netmask of a prefix length.
pub fn prefix_mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

/// IPv4 addresses of every interface except loopback and `skip` (the overlay device): the
/// node's local endpoint candidates.
pub async fn local_ipv4_addresses(skip: &str) -> Result<Vec<Ipv4Addr>, NetlinkError> {
    let handle = connect()?;
    let skip_index = link_index(&handle, skip).await.ok();
    let mut out = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Ok(Some(msg)) = addrs.try_next().await {
        if Some(msg.header.index) == skip_index {
            continue;
        }
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                if !ip.is_loopback() && !ip.is_link_local() && !out.contains(ip) {
                    out.push(*ip);
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
    use rtnetlink::packet_route::route::{RouteAttribute, RouteMetric};
    let handle = connect()?;
    let index = link_index(&handle, interface).await?;
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(peer, 32)
        .output_interface(index)
        .pref_source(source)
        .build();
    let req = |what: &'static str| {
        let link = interface.to_owned();
        move |source| NetlinkError::Request { what, link, source }
    };
    match mtu {
        Some(mtu) => {
            route
                .attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(req("setting a peer route MTU"))
        }
        None => match handle.route().del(route).execute().await {
            Ok(()) => Ok(()),
            // ESRCH: there was no such route.
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -3 => Ok(()),
            Err(e) => Err(req("removing a peer route MTU")(e)),
        },
    }
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
