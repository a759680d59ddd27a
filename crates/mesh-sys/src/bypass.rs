//! Keeping mesh's own packets off the overlay.
//!
//! mesh's underlay traffic (WireGuard, QUIC to the controller and relays, discovery, birthday
//! probes) must never be routed into the overlay interface: a peer endpoint that is only
//! reachable through `mesh0` (the address of a vxlan device stacked on it, a pod subnet routed
//! over it) would put WireGuard inside WireGuard, a routing loop.
//!
//! Every socket of the agent carries the firewall mark [`MARK`] ([`mark_socket`]); the overlay
//! interface is put in interface group [`IFGROUP`]; and two policy-routing rules ([`install`])
//! make sure a marked packet never leaves through that group:
//!
//! ```text
//! RULE_PREF:     from all fwmark MARK/MARK lookup main suppress_ifgroup IFGROUP
//! RULE_PREF + 1: from all fwmark MARK/MARK unreachable
//! ```
//!
//! The first rule routes marked packets by the main table unless its answer is the overlay
//! interface; the second refuses what the first suppressed, so it does not fall through to the
//! main table's overlay route after all. An encapsulation stacked on the overlay (a vxlan
//! device whose outer packets go out `mesh0`) does its outer route lookup with the inner
//! packet's mark, so a marked packet that enters one is refused at that second lookup.
//!
//! Setting a mark needs CAP_NET_ADMIN. Without it the caller falls back to filtering endpoint
//! candidates (which it does anyway) and says so in the log.

use crate::netlink::{connect, NetlinkError};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, LinkUnspec};
use std::io;

/// Firewall mark on every packet of mesh's own sockets. One bit (matched with the same mask),
/// away from the bits kube-proxy (0x4000, 0x8000), Cilium (0x0f00) and Tailscale (0xff0000) use.
pub const MARK: u32 = 0x0100_0000;
/// Interface group of the overlay interface (ASCII "ms").
pub const IFGROUP: u32 = 0x6d73;
/// Priority of the first of the two rules: late, just before the main table's own rule
/// (32766), so that rules an administrator placed earlier still choose the underlay.
pub const RULE_PREF: u32 = 32_600;

/// Sets [`MARK`] on a socket. Fails without CAP_NET_ADMIN.
pub fn mark_socket<S: std::os::fd::AsFd>(socket: &S) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(MARK)
}

fn request(what: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let link = link.to_owned();
    move |source| NetlinkError::Request { what, link, source }
}

/// Puts `interface` in [`IFGROUP`] and installs the two rules (replacing ours from an earlier
/// run). Idempotent.
pub async fn install(interface: &str) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let index = crate::netlink::link_index(&handle, interface).await?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .link_group(IFGROUP)
                .build(),
        )
        .execute()
        .await
        .map_err(request("setting the interface group", interface))?;
    delete_rules(&handle).await;
    let mut suppress = handle
        .rule()
        .add()
        .v4()
        .priority(RULE_PREF)
        .fw_mark(MARK)
        .table_id(254)
        .action(RuleAction::ToTable);
    let attrs = &mut suppress.message_mut().attributes;
    attrs.push(RuleAttribute::FwMask(MARK));
    attrs.push(RuleAttribute::SuppressIfGroup(IFGROUP));
    suppress
        .execute()
        .await
        .map_err(request("adding the bypass rule", interface))?;
    let mut refuse = handle
        .rule()
        .add()
        .v4()
        .priority(RULE_PREF + 1)
        .fw_mark(MARK)
        .action(RuleAction::Unreachable);
    // An unreachable rule consults no table (the request starts out naming the main one).
    refuse.message_mut().header.table = 0;
    refuse
        .message_mut()
        .attributes
        .push(RuleAttribute::FwMask(MARK));
    refuse
        .execute()
        .await
        .map_err(request("adding the bypass rule", interface))?;
    Ok(())
}

/// Removes the two rules (on `mesh leave` and when the daemon stops). Missing rules are fine.
pub async fn remove() -> Result<(), NetlinkError> {
    let handle = connect()?;
    delete_rules(&handle).await;
    Ok(())
}

/// Whether both rules are in place (for `mesh status` and tests).
pub async fn installed() -> Result<bool, NetlinkError> {
    let handle = connect()?;
    Ok(our_rules(&handle).await.len() == 2)
}

async fn our_rules(handle: &Handle) -> Vec<rtnetlink::packet_route::rule::RuleMessage> {
    let mut out = Vec::new();
    let mut rules = handle.rule().get(IpVersion::V4).execute();
    while let Ok(Some(rule)) = rules.try_next().await {
        let ours = rule.attributes.iter().any(
            |a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PREF || *p == RULE_PREF + 1),
        ) && rule
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::FwMark(m) if *m == MARK));
        if ours {
            out.push(rule);
        }
    }
    out
}

async fn delete_rules(handle: &Handle) {
    for rule in our_rules(handle).await {
        if let Err(e) = handle.rule().del(rule).execute().await {
            tracing::debug!(error = %e, "removing a bypass rule");
        }
    }
}
