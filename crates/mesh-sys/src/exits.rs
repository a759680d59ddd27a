//! Routes through an exit node: prefixes (`0.0.0.0/0` for everything) that a peer offers as an
//! exit and this node chose to use (`mesh up --exit-node NODE`).
//!
//! They live in their own routing table, [`TABLE`], consulted by two policy rules per address
//! family (IPv6 exits such as `::/0` as IPv4 ones) for every packet that does not carry mesh's
//! own mark ([`crate::bypass::MARK`]):
//!
//! ```text
//! RULE_PREF:     not from all fwmark MARK/MARK lookup main suppress_prefixlength 0
//! RULE_PREF + 1: not from all fwmark MARK/MARK lookup TABLE
//! ```
//!
//! The first lets the main table answer with anything but its default route (the LAN, the
//! overlay, pod subnets and other specific routes stay as they are); the second sends the rest
//! to the exit. mesh's own packets (WireGuard, QUIC to the controller and relays) carry the
//! mark, skip both rules and keep leaving through the underlay's default route, so the tunnel
//! never tries to carry itself.

use crate::netlink::{connect, link_index, NetlinkError};
use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The routing table of the exit routes (ASCII "ms", as the interface group).
pub const TABLE: u32 = 0x6d73;
/// Priority of the first of the two rules: before the bypass rules and the main table.
pub const RULE_PREF: u32 = 32_590;

fn request(what: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let link = link.to_owned();
    move |source| NetlinkError::Request { what, link, source }
}

/// Routes `prefixes` through `interface` for every unmarked packet, replacing what an earlier
/// call installed; with no prefixes, removes the rules and routes. Idempotent. `source`: the
/// overlay addresses, the preferred source of the routes of each family (an IPv6 exit without
/// an IPv6 overlay address leaves the source to the kernel). Rules go in only for the
/// families that have prefixes.
pub async fn install(
    interface: &str,
    source: (Ipv4Addr, Option<Ipv6Addr>),
    prefixes: &[IpNet],
) -> Result<(), NetlinkError> {
    let handle = connect()?;
    flush_table(&handle).await;
    delete_rules(&handle).await;
    if prefixes.is_empty() {
        return Ok(());
    }
    let index = link_index(&handle, interface).await?;
    for prefix in prefixes {
        let mut route = match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.network(), p.prefix_len())
                .output_interface(index)
                .pref_source(source.0)
                .build(),
            IpNet::V6(p) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len())
                    .output_interface(index);
                if let Some(s) = source.1 {
                    b = b.pref_source(s);
                }
                b.build()
            }
        };
        route.header.table = RouteHeader::RT_TABLE_UNSPEC;
        route.attributes.push(RouteAttribute::Table(TABLE));
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(request("adding an exit route", interface))?;
    }
    if prefixes.iter().any(|p| matches!(p, IpNet::V4(_))) {
        let rule = || handle.rule().add().v4();
        add_rules(rule(), rule(), interface).await?;
    }
    if prefixes.iter().any(|p| matches!(p, IpNet::V6(_))) {
        let rule = || handle.rule().add().v6();
        add_rules(rule(), rule(), interface).await?;
    }
    Ok(())
}

/// The two rules of one family (see the module docs), from two fresh requests of it.
async fn add_rules<T>(
    main: rtnetlink::RuleAddRequest<T>,
    exit: rtnetlink::RuleAddRequest<T>,
    interface: &str,
) -> Result<(), NetlinkError> {
    let mut main = main
        .priority(RULE_PREF)
        .fw_mark(crate::bypass::MARK)
        .table_id(254)
        .action(RuleAction::ToTable);
    main.message_mut().header.flags = RuleFlags::Invert;
    let attrs = &mut main.message_mut().attributes;
    attrs.push(RuleAttribute::FwMask(crate::bypass::MARK));
    attrs.push(RuleAttribute::SuppressPrefixLen(0));
    main.execute()
        .await
        .map_err(request("adding the exit rule", interface))?;
    let mut exit = exit
        .priority(RULE_PREF + 1)
        .fw_mark(crate::bypass::MARK)
        .table_id(TABLE)
        .action(RuleAction::ToTable);
    exit.message_mut().header.flags = RuleFlags::Invert;
    exit.message_mut()
        .attributes
        .push(RuleAttribute::FwMask(crate::bypass::MARK));
    exit.execute()
        .await
        .map_err(request("adding the exit rule", interface))?;
    Ok(())
}

/// Removes the rules and the routes (when the daemon stops). Missing ones are fine.
pub async fn remove() -> Result<(), NetlinkError> {
    let handle = connect()?;
    delete_rules(&handle).await;
    flush_table(&handle).await;
    Ok(())
}

async fn delete_rules(handle: &Handle) {
    let mut ours = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut rules = handle.rule().get(version).execute();
        while let Ok(Some(rule)) = rules.try_next().await {
            if rule.attributes.iter().any(
                |a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PREF || *p == RULE_PREF + 1),
            ) {
                ours.push(rule);
            }
        }
    }
    for rule in ours {
        if let Err(e) = handle.rule().del(rule).execute().await {
            tracing::debug!(error = %e, "removing an exit rule");
        }
    }
}

async fn flush_table(handle: &Handle) {
    let ours = crate::netlink::dump_routes(handle)
        .await
        .into_iter()
        .filter(|msg| crate::netlink::table_of(msg) == TABLE);
    for msg in ours {
        if let Err(e) = handle.route().del(msg).execute().await {
            tracing::debug!(error = %e, "removing an exit route");
        }
    }
}
