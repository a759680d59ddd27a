//! Subnet routes: IPv4 and IPv6 prefixes a node routes for its peers (its pod subnets, say).
//!
//! The rules are the same for both families, each judged against its own: a prefix overlaps
//! only prefixes of its family, the IPv4 overlay range or the network's IPv6 overlay prefix.
//!
//! A node advertises its whole list in every `Hello` and `Heartbeat`; [`Store::advertise_routes`]
//! keeps one row of `routes` per network, node key and prefix (canonical: host bits cleared).
//! Each row is in one state:
//! - `refused`: the controller's rules forbid it, with a reason naming the conflict: it
//!   overlaps the overlay range, or another node's approved or pending prefix, or it is an
//!   exit route (shorter than /8) or a range that is never routed (loopback, link-local,
//!   multicast...). A refused prefix is judged again whenever a conflict may have gone (a route
//!   withdrawn, rejected or removed with its node), and becomes pending or approved then.
//! - `approved`: peers route it to the node. The network's policy approves a prefix inside one
//!   of its auto-approve prefixes at once; the administrator approves the others
//!   ([`Store::approve_routes`]).
//! - `pending`: waiting for the administrator.
//! - `rejected`: the administrator said no ([`Store::reject_routes`]); it stays so while the
//!   node advertises it, unless the administrator approves it after all.
//!
//! A prefix the node no longer advertises is deleted; so are all of a node's routes when it is
//! removed or leaves: if it joins again, it advertises afresh. Overlaps are checked between
//! nodes only: one node may advertise a prefix and a part of it.

use super::sql::{params, Conn};
use super::{approval::AUTO_APPROVER, network_by_name, rfc3339, Store, StoreError, Who};
use mesh_proto::control::{
    IpNet, Ipv4Net, Ipv6Net, RouteState, RouteStatus, MAX_ERROR_TEXT, MAX_ROUTES,
};
use mesh_proto::PublicKey;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Ranges no node may route, with what they are.
const NEVER_ROUTED: [(IpNet, &str); 8] = [
    (v4(0, 0, 0, 0, 8), "\"this network\""),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved and broadcast"),
    (v6(0, 8), "reserved: unspecified, loopback and IPv4-mapped"),
    (v6(0xfe80, 10), "link-local"),
    (v6(0xff00, 8), "multicast"),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len))
}

const fn v6(first: u16, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0),
        len,
    ))
}

/// The shortest IPv4 prefix a node may advertise as a route; anything shorter is an exit.
const MIN_PREFIX_LEN: u8 = 8;
/// The shortest IPv6 prefix a node may advertise as a route; anything shorter is an exit.
const MIN_PREFIX6_LEN: u8 = 16;

/// The shortest route `prefix`'s family allows.
fn min_len(prefix: IpNet) -> u8 {
    match prefix {
        IpNet::V4(_) => MIN_PREFIX_LEN,
        IpNet::V6(_) => MIN_PREFIX6_LEN,
    }
}

/// Parses an IPv4 or IPv6 prefix as the administrator types it (`a.b.c.d/n`, `x:y::/n`) with
/// the host bits clear.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let prefix: IpNet = text.parse().map_err(|_| {
        format!("{text} is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)")
    })?;
    if prefix.trunc() != prefix {
        return Err(format!(
            "{text} has host bits set; did you mean {}?",
            prefix.trunc()
        ));
    }
    Ok(prefix)
}

/// Parses a comma-separated list of prefixes ([`parse_prefix`]), or `none` for an empty one.
pub fn parse_prefix_list(text: &str) -> Result<Vec<IpNet>, String> {
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let prefixes = text
        .split(',')
        .map(parse_prefix)
        .collect::<Result<BTreeSet<_>, _>>()?;
    if prefixes.len() > MAX_ROUTES {
        return Err(format!(
            "{} prefixes given; at most {MAX_ROUTES} fit: use shorter prefixes that cover several",
            prefixes.len()
        ));
    }
    Ok(prefixes.into_iter().collect())
}

/// An advertised route as `mesh-controller route list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRow {
    /// The name of the node that advertises it.
    pub node: String,
    /// That node's key.
    pub key: PublicKey,
    /// The prefix, `a.b.c.d/n`.
    pub prefix: String,
    /// `pending`, `approved`, `rejected` or `refused`.
    pub state: String,
    /// Why it is refused.
    pub reason: Option<String>,
    /// Who approved or rejected it: an administrator, or `auto (network policy)`.
    pub decided_by: Option<String>,
    /// When it was approved, rejected or refused, RFC 3339 UTC.
    pub decided_at: Option<String>,
    /// Offered as an exit (`mesh up --advertise-exit`) rather than a route of the node's site.
    pub exit: bool,
}

/// One row of `routes`, with the name of its node.
#[derive(Debug, Clone)]
struct Route {
    id: i64,
    key: String,
    node: String,
    prefix: IpNet,
    state: RouteStatus,
    reason: Option<String>,
    decided_at: Option<i64>,
    decided_by: Option<String>,
    /// Offered as an exit: peers use it only when they opt in, and it blocks no one.
    exit: bool,
}

impl Route {
    fn row(&self) -> Option<RouteRow> {
        Some(RouteRow {
            node: self.node.clone(),
            key: self.key.parse().ok()?,
            prefix: self.prefix.to_string(),
            state: state_text(self.state).to_owned(),
            reason: self.reason.clone(),
            decided_by: self.decided_by.clone(),
            decided_at: self.decided_at.map(|t| rfc3339(t.max(0) as u64)),
            exit: self.exit,
        })
    }

    /// Whether it keeps other nodes from routing prefixes that overlap it (an exit never
    /// does: a node uses it only by choice, and more specific routes win over it).
    fn holds(&self) -> bool {
        !self.exit && matches!(self.state, RouteStatus::Approved | RouteStatus::Pending)
    }
}

/// What the network's rules say of a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Approved,
    Pending,
    Refused(String),
}

/// A network's overlay ranges and auto-approve prefixes.
struct Policy {
    /// The IPv4 overlay and, when the network has one, the IPv6 overlay.
    overlays: Vec<IpNet>,
    auto: Vec<IpNet>,
}

fn state_text(state: RouteStatus) -> &'static str {
    match state {
        RouteStatus::Approved => "approved",
        RouteStatus::Pending => "pending",
        RouteStatus::Rejected => "rejected",
        RouteStatus::Refused => "refused",
    }
}

fn state_from(text: &str) -> Option<RouteStatus> {
    [
        RouteStatus::Approved,
        RouteStatus::Pending,
        RouteStatus::Rejected,
        RouteStatus::Refused,
    ]
    .into_iter()
    .find(|s| state_text(*s) == text)
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The stored form of a policy: comma-separated prefixes, `NULL` for none.
fn encode_auto(prefixes: &[IpNet]) -> Option<String> {
    (!prefixes.is_empty()).then(|| {
        prefixes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// The stored policy; entries that do not parse (never written so) are left out.
pub(super) fn decode_auto(text: Option<&str>) -> Vec<IpNet> {
    text.map_or_else(Vec::new, |t| {
        t.split(',').filter_map(|p| p.trim().parse().ok()).collect()
    })
}

/// At most [`MAX_ERROR_TEXT`] bytes, which is what the wire carries.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn policy(conn: &Conn, network_id: i64) -> Result<Policy, StoreError> {
    let (net, len, auto): (u32, u8, Option<String>) = conn.query_row(
        "SELECT network, prefix_len, auto_approve_routes FROM networks WHERE id = ?1",
        [network_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let overlay = Ipv4Net::new(Ipv4Addr::from(net), len)
        .map_err(|_| StoreError::Invalid(format!("network id {network_id} has a bad range")))?;
    let overlay6 = super::ipam6::prefix_of(conn, network_id)?;
    Ok(Policy {
        overlays: std::iter::once(IpNet::V4(overlay))
            .chain(overlay6.map(IpNet::V6))
            .collect(),
        auto: decode_auto(auto.as_deref()),
    })
}

/// The network's routes, oldest first, with the names of their nodes.
fn load(conn: &Conn, network_id: i64) -> Result<Vec<Route>, StoreError> {
    let mut st = conn.prepare(
        "SELECT r.id, r.key, n.name, r.prefix, r.state, r.reason, r.decided_at, r.decided_by,
             r.exit
         FROM routes r
         LEFT JOIN nodes n ON n.network_id = r.network_id AND n.key = r.key
             AND n.removed_at IS NULL
         WHERE r.network_id = ?1 ORDER BY r.advertised_at, r.id",
    )?;
    let rows = st.query_map([network_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, Option<String>>(7)?,
            r.get::<_, bool>(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, key, node, prefix, state, reason, decided_at, decided_by, exit) = row?;
        // Rows this code did not write are left out.
        let (Ok(prefix), Some(state)) = (prefix.parse(), state_from(&state)) else {
            continue;
        };
        let node = node.unwrap_or_else(|| format!("{}…", key.chars().take(8).collect::<String>()));
        out.push(Route {
            id,
            key,
            node,
            prefix,
            state,
            reason,
            decided_at,
            decided_by,
            exit,
        });
    }
    Ok(out)
}

/// Why no node may route `prefix`, whoever else routes what. An exit may contain ranges that
/// are never routed (0.0.0.0/0 contains them all: a host routes them locally before any exit),
/// but not lie inside one.
fn never_routed(prefix: IpNet, exit: bool) -> Option<String> {
    if exit {
        return NEVER_ROUTED
            .iter()
            .find(|(range, _)| range.contains(&prefix))
            .map(|(range, what)| format!("lies in {range} ({what}), which is never routed"));
    }
    if prefix.prefix_len() < min_len(prefix) {
        let example = match prefix {
            IpNet::V4(_) => "10.244.1.0/24",
            IpNet::V6(_) => "fd00:10:244:1::/64",
        };
        return Some(format!(
            "{prefix} is shorter than /{}: offer it as an exit (`mesh up --advertise-exit {prefix}`; peers use it only with --exit-node), or advertise the subnets behind the node, e.g. {example}",
            min_len(prefix)
        ));
    }
    NEVER_ROUTED
        .iter()
        .find(|(range, _)| overlaps(*range, prefix))
        .map(|(range, what)| format!("overlaps {range} ({what}), which is never routed"))
}

/// What the rules say of `prefix`, advertised by `key` (as an exit or not), beside the
/// network's `routes`.
fn judge(prefix: IpNet, exit: bool, key: &str, policy: &Policy, routes: &[Route]) -> Verdict {
    if let Some(reason) = never_routed(prefix, exit) {
        return Verdict::Refused(reason);
    }
    if exit {
        // An exit may contain the overlay range and other nodes' prefixes (those stay more
        // specific), but not lie inside the overlay.
        if let Some(overlay) = policy.overlays.iter().find(|o| o.contains(&prefix)) {
            return Verdict::Refused(format!(
                "lies inside the network's overlay range {overlay}; an exit leads out of the overlay"
            ));
        }
        return if policy.auto.iter().any(|a| a.contains(&prefix)) {
            Verdict::Approved
        } else {
            Verdict::Pending
        };
    }
    if let Some(overlay) = policy.overlays.iter().find(|o| overlaps(prefix, **o)) {
        return Verdict::Refused(format!(
            "overlaps the network's overlay range {overlay}; advertise a prefix outside it"
        ));
    }
    let conflict = routes
        .iter()
        .find(|r| r.key != key && r.holds() && overlaps(r.prefix, prefix));
    if let Some(other) = conflict {
        return Verdict::Refused(format!(
            "overlaps {} of node {} ({}): one node routes each address; this prefix is judged again when that route goes",
            other.prefix,
            other.node,
            state_text(other.state)
        ));
    }
    if policy.auto.iter().any(|a| a.contains(&prefix)) {
        Verdict::Approved
    } else {
        Verdict::Pending
    }
}

/// The columns a verdict writes: state, reason, decided_at, decided_by.
fn verdict_columns(
    verdict: &Verdict,
    now: u64,
) -> (RouteStatus, Option<String>, Option<i64>, Option<String>) {
    match verdict {
        Verdict::Approved => (
            RouteStatus::Approved,
            None,
            Some(now as i64),
            Some(AUTO_APPROVER.to_owned()),
        ),
        Verdict::Pending => (RouteStatus::Pending, None, None, None),
        Verdict::Refused(reason) => (
            RouteStatus::Refused,
            Some(bounded(reason.clone())),
            Some(now as i64),
            None,
        ),
    }
}

/// Judges every refused route of the network again, oldest first, as conflicts may have gone;
/// whether any changed.
pub(super) fn rejudge_refused(conn: &Conn, network_id: i64, now: u64) -> Result<bool, StoreError> {
    let mut routes = load(conn, network_id)?;
    if !routes.iter().any(|r| r.state == RouteStatus::Refused) {
        return Ok(false);
    }
    let policy = policy(conn, network_id)?;
    let mut changed = false;
    for i in 0..routes.len() {
        if routes[i].state != RouteStatus::Refused {
            continue;
        }
        let verdict = judge(
            routes[i].prefix,
            routes[i].exit,
            &routes[i].key,
            &policy,
            &routes,
        );
        let same = match (&verdict, &routes[i].reason) {
            (Verdict::Refused(new), Some(old)) => bounded(new.clone()) == *old,
            _ => false,
        };
        if same {
            continue;
        }
        let (state, reason, decided_at, decided_by) = verdict_columns(&verdict, now);
        conn.execute(
            "UPDATE routes SET state = ?1, reason = ?2, decided_at = ?3, decided_by = ?4
             WHERE id = ?5",
            params![
                state_text(state),
                reason,
                decided_at,
                decided_by,
                routes[i].id
            ],
        )?;
        let route = &mut routes[i];
        (
            route.state,
            route.reason,
            route.decided_at,
            route.decided_by,
        ) = (state, reason, decided_at, decided_by);
        changed = true;
    }
    Ok(changed)
}

/// Deletes every route of `key` in the network (it was removed or left) and judges the refused
/// ones again.
pub(super) fn forget_routes(
    conn: &Conn,
    network_id: i64,
    key: &str,
    now: u64,
) -> Result<(), StoreError> {
    let deleted = conn.execute(
        "DELETE FROM routes WHERE network_id = ?1 AND key = ?2",
        params![network_id, key],
    )?;
    if deleted > 0 {
        rejudge_refused(conn, network_id, now)?;
    }
    Ok(())
}

/// Each node's approved prefixes, by node key, sorted: its routes, and its exits. What
/// `peers` hands out.
pub(super) fn approved_by_key(
    conn: &Conn,
    network_id: i64,
) -> Result<HashMap<String, Approved>, StoreError> {
    let mut st = conn.prepare(
        "SELECT key, prefix, exit FROM routes WHERE network_id = ?1 AND state = 'approved'",
    )?;
    let rows = st.query_map([network_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, bool>(2)?,
        ))
    })?;
    let mut out: HashMap<String, Approved> = HashMap::new();
    for row in rows {
        let (key, prefix, exit) = row?;
        if let Ok(prefix) = prefix.parse() {
            let entry = out.entry(key).or_default();
            if exit {
                entry.exits.push(prefix);
            } else {
                entry.routes.push(prefix);
            }
        }
    }
    for a in out.values_mut() {
        a.routes.sort();
        a.exits.sort();
    }
    Ok(out)
}

/// A node's approved prefixes.
#[derive(Debug, Clone, Default)]
pub(super) struct Approved {
    /// Routes of its site: every peer routes them to it.
    pub routes: Vec<IpNet>,
    /// Exits: peers route them to it only by choice.
    pub exits: Vec<IpNet>,
}

/// Whether the administrator approves or rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Approve,
    Reject,
}

impl Decision {
    fn verb(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
        }
    }

    /// The states a route must be in to be decided so.
    fn applies_to(self, state: RouteStatus) -> bool {
        match self {
            // The administrator may change their mind about a rejected route.
            Decision::Approve => matches!(state, RouteStatus::Pending | RouteStatus::Rejected),
            // Rejecting an approved route withdraws the approval.
            Decision::Reject => matches!(state, RouteStatus::Pending | RouteStatus::Approved),
        }
    }
}

/// The routes `who` names, as indices into `routes`, each once, in the order named (oldest
/// first for [`Who::All`]); an error that says what to do when an entry names none.
fn choose(
    routes: &[Route],
    network: &str,
    who: Who<'_>,
    decision: Decision,
) -> Result<Vec<usize>, StoreError> {
    let verb = decision.verb();
    let see = format!("see `mesh-controller route list {network}`");
    let entries = match who {
        Who::All => {
            let pending: Vec<usize> = (0..routes.len())
                .filter(|i| routes[*i].state == RouteStatus::Pending)
                .collect();
            if pending.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "no pending routes in network {network:?} to {verb}; {see}"
                )));
            }
            return Ok(pending);
        }
        Who::These([]) => {
            return Err(StoreError::Invalid(format!(
                "name the routes to {verb} (by prefix, or by node name for all of its pending ones, as `mesh-controller route list {network}` lists them), or all pending ones with --all"
            )))
        }
        Who::These(entries) => entries,
    };
    let mut chosen = Vec::new();
    for entry in entries {
        let entry = entry.trim();
        let found: Vec<usize> = if entry.contains('/') {
            let prefix: IpNet = entry.parse().map_err(|_| {
                StoreError::Invalid(format!(
                    "{entry} is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)"
                ))
            })?;
            let prefix = prefix.trunc();
            let matching: Vec<usize> = (0..routes.len())
                .filter(|i| routes[*i].prefix == prefix)
                .collect();
            let Some(first) = matching.first().map(|i| &routes[*i]) else {
                return Err(StoreError::Invalid(format!(
                    "no node advertises {prefix} in network {network:?}; {see}"
                )));
            };
            let able: Vec<usize> = matching
                .iter()
                .copied()
                .filter(|i| decision.applies_to(routes[*i].state))
                .collect();
            if able.is_empty() {
                return Err(StoreError::Invalid(cannot(first, decision, &see)));
            }
            able
        } else {
            let of_node: Vec<usize> = (0..routes.len())
                .filter(|i| routes[*i].node == entry || routes[*i].key == entry)
                .collect();
            if of_node.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "no route or node with routes matches {entry:?} in network {network:?}; {see}"
                )));
            }
            let pending: Vec<usize> = of_node
                .into_iter()
                .filter(|i| routes[*i].state == RouteStatus::Pending)
                .collect();
            if pending.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "node {entry} has no pending routes to {verb}; name its routes by prefix instead ({see})"
                )));
            }
            pending
        };
        for i in found {
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
    }
    Ok(chosen)
}

/// Why `route` cannot be decided so.
fn cannot(route: &Route, decision: Decision, see: &str) -> String {
    let what = format!("{} of {}", route.prefix, route.node);
    match route.state {
        RouteStatus::Refused => format!(
            "cannot {} {what}: the controller refused it ({}); it is judged again when the conflict goes",
            decision.verb(),
            route.reason.as_deref().unwrap_or("no reason recorded")
        ),
        RouteStatus::Approved => format!("{what} is approved already; {see}"),
        RouteStatus::Rejected => format!("{what} is rejected already; {see}"),
        RouteStatus::Pending => format!("{what} is pending; {see}"),
    }
}

impl Store {
    /// Replaces the prefixes node `key` advertises in the network with `prefixes` (its whole
    /// list; host bits are cleared, duplicates dropped), in one transaction: prefixes it no
    /// longer advertises are deleted, new ones judged (refused, approved by the network's
    /// policy, or pending), kept ones keep their state, and refused ones anywhere in the
    /// network are judged again. Whether any route of the network changed: then push route
    /// states and peer lists. Only a live member may advertise.
    pub fn advertise_routes(
        &mut self,
        network_id: i64,
        key: &PublicKey,
        prefixes: &[IpNet],
        now: u64,
    ) -> Result<bool, StoreError> {
        self.advertise(network_id, key, prefixes, &[], now)
    }

    /// [`Store::advertise_routes`] with the prefixes the node offers as exits beside its
    /// routes (a prefix in both lists is a route).
    pub fn advertise(
        &mut self,
        network_id: i64,
        key: &PublicKey,
        prefixes: &[IpNet],
        exits: &[IpNet],
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut wanted: BTreeMap<IpNet, bool> = exits.iter().map(|p| (p.trunc(), true)).collect();
        wanted.extend(prefixes.iter().map(|p| (p.trunc(), false)));
        if prefixes.len().max(exits.len()) > MAX_ROUTES {
            return Err(StoreError::Invalid(format!(
                "{} prefixes advertised; a node may advertise at most {MAX_ROUTES}: advertise shorter prefixes that cover several",
                prefixes.len().max(exits.len())
            )));
        }
        let tx = self.conn.transaction()?;
        let key = key.to_string();
        if !is_live(&tx, network_id, &key)? {
            return Err(StoreError::Invalid(format!(
                "node {key} is not a member of network id {network_id}; only members advertise routes: join first (`mesh join`)"
            )));
        }
        let mut known = BTreeSet::new();
        let mut changed = false;
        for (id, prefix, exit) in routes_of(&tx, network_id, &key)? {
            match prefix.filter(|p| wanted.get(p) == Some(&exit)) {
                Some(p) => {
                    known.insert(p);
                }
                None => {
                    tx.execute("DELETE FROM routes WHERE id = ?1", [id])?;
                    changed = true;
                }
            }
        }
        // Refused routes, older than what this node adds, are judged first: what it withdrew
        // may have freed them. A prefix that stays advertised keeps its state, but a refused
        // one is judged again too.
        changed |= rejudge_refused(&tx, network_id, now)?;
        let added: Vec<(IpNet, bool)> = wanted
            .iter()
            .filter(|(p, _)| !known.contains(*p))
            .map(|(p, e)| (*p, *e))
            .collect();
        if !added.is_empty() {
            let mut routes = load(&tx, network_id)?;
            let policy = policy(&tx, network_id)?;
            let node: String = tx.query_row(
                "SELECT name FROM nodes WHERE network_id = ?1 AND key = ?2",
                params![network_id, key],
                |r| r.get(0),
            )?;
            for (prefix, exit) in added {
                let verdict = judge(prefix, exit, &key, &policy, &routes);
                let (state, reason, decided_at, decided_by) = verdict_columns(&verdict, now);
                let id: i64 = tx.query_row(
                    "INSERT INTO routes (network_id, key, prefix, state, reason, advertised_at,
                         decided_at, decided_by, exit)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
                    params![
                        network_id,
                        key,
                        prefix.to_string(),
                        state_text(state),
                        reason,
                        now as i64,
                        decided_at,
                        decided_by,
                        exit
                    ],
                    |r| r.get(0),
                )?;
                routes.push(Route {
                    id,
                    key: key.clone(),
                    node: node.clone(),
                    prefix,
                    state,
                    reason,
                    decided_at,
                    decided_by,
                    exit,
                });
                changed = true;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Where every advertised prefix of the network stands, by node: what the hub tells each
    /// node about its own routes (`ServerMsg::Routes`). Nodes that advertise nothing are
    /// absent; each list is sorted by prefix.
    pub fn route_states(
        &self,
        network_id: i64,
    ) -> Result<HashMap<PublicKey, Vec<RouteState>>, StoreError> {
        let network: String = self.conn.query_row(
            "SELECT name FROM networks WHERE id = ?1",
            [network_id],
            |r| r.get(0),
        )?;
        let mut out: HashMap<PublicKey, Vec<RouteState>> = HashMap::new();
        for route in load(&self.conn, network_id)? {
            let Ok(key) = route.key.parse() else { continue };
            let approve = format!("`mesh-controller route approve {network} {}`", route.prefix);
            let reason = match route.state {
                RouteStatus::Approved => None,
                RouteStatus::Pending => Some(format!(
                    "waiting for the administrator of network {network} to approve it ({approve} on the controller)"
                )),
                RouteStatus::Rejected => Some(format!(
                    "rejected by {} at {}; ask the administrator to approve it ({approve})",
                    route.decided_by.as_deref().unwrap_or("the administrator"),
                    route
                        .decided_at
                        .map_or_else(|| "an unknown time".to_owned(), |t| rfc3339(t.max(0) as u64))
                )),
                RouteStatus::Refused => route.reason,
            };
            out.entry(key).or_default().push(RouteState {
                prefix: route.prefix,
                state: route.state,
                reason: reason.map(bounded),
                exit: route.exit,
            });
        }
        for states in out.values_mut() {
            states.sort_by_key(|s| s.prefix);
        }
        Ok(out)
    }

    /// Every route advertised in `network`, by prefix (then node name).
    pub fn routes(&self, network: &str) -> Result<Vec<RouteRow>, StoreError> {
        let (network_id, _) = self.network(network)?;
        let mut routes = load(&self.conn, network_id)?;
        routes.sort_by(|a, b| (a.prefix, &a.node).cmp(&(b.prefix, &b.node)));
        Ok(routes.iter().filter_map(Route::row).collect())
    }

    /// Approves the routes `who` names, all or none: an entry is a prefix (matched exactly,
    /// host bits cleared), or a node's name or key (all of its pending routes); [`Who::All`]
    /// is every pending route. A rejected route may be approved; a refused one may not, nor
    /// one that overlaps another node's approved prefix. Records `by` as who approved them;
    /// the routes approved.
    pub fn approve_routes(
        &mut self,
        network: &str,
        who: Who<'_>,
        by: &str,
        now: u64,
    ) -> Result<Vec<RouteRow>, StoreError> {
        self.decide_routes(network, who, Decision::Approve, by, now)
    }

    /// Rejects the routes `who` names, all or none, as [`Store::approve_routes`] names them;
    /// an approved route may be rejected (its approval is withdrawn). Their nodes keep
    /// advertising them, and they stay rejected until approved. Records `by` as who rejected
    /// them; the routes rejected.
    pub fn reject_routes(
        &mut self,
        network: &str,
        who: Who<'_>,
        by: &str,
        now: u64,
    ) -> Result<Vec<RouteRow>, StoreError> {
        self.decide_routes(network, who, Decision::Reject, by, now)
    }

    fn decide_routes(
        &mut self,
        network: &str,
        who: Who<'_>,
        decision: Decision,
        by: &str,
        now: u64,
    ) -> Result<Vec<RouteRow>, StoreError> {
        let tx = self.conn.transaction()?;
        let (network_id, _) = network_by_name(&tx, network)?;
        let mut routes = load(&tx, network_id)?;
        let chosen = choose(&routes, network, who, decision)?;
        let state = match decision {
            Decision::Approve => RouteStatus::Approved,
            Decision::Reject => RouteStatus::Rejected,
        };
        for &i in &chosen {
            if decision == Decision::Approve {
                let route = &routes[i];
                // Exits conflict with nothing (see `Route::holds`).
                let conflict = routes.iter().find(|r| {
                    !route.exit
                        && !r.exit
                        && r.key != route.key
                        && r.state == RouteStatus::Approved
                        && overlaps(r.prefix, route.prefix)
                });
                if let Some(other) = conflict {
                    return Err(StoreError::Invalid(format!(
                        "cannot approve {} of {}: it overlaps {} of {}, which is approved, and one node routes each address; reject that one first (`mesh-controller route reject {network} {}`); nothing was approved",
                        route.prefix, route.node, other.prefix, other.node, other.prefix
                    )));
                }
            }
            tx.execute(
                "UPDATE routes SET state = ?1, reason = NULL, decided_at = ?2, decided_by = ?3
                 WHERE id = ?4",
                params![state_text(state), now as i64, by, routes[i].id],
            )?;
            let route = &mut routes[i];
            (
                route.state,
                route.reason,
                route.decided_at,
                route.decided_by,
            ) = (state, None, Some(now as i64), Some(by.to_owned()));
        }
        if decision == Decision::Reject {
            // What it held may now be free for a refused route.
            rejudge_refused(&tx, network_id, now)?;
        }
        tx.commit()?;
        Ok(chosen.iter().filter_map(|i| routes[*i].row()).collect())
    }

    /// Sets the prefixes inside which `network` approves advertised routes automatically
    /// (empty: none; each prefix with its host bits clear). Pending routes the new policy
    /// covers are approved at once (at `now`), unless they overlap another node's approved
    /// prefix.
    pub fn set_auto_approve_routes(
        &self,
        network: &str,
        prefixes: &[IpNet],
        now: u64,
    ) -> Result<(), StoreError> {
        if let Some(p) = prefixes.iter().find(|p| p.trunc() != **p) {
            return Err(StoreError::Invalid(format!(
                "{p} has host bits set; did you mean {}?",
                p.trunc()
            )));
        }
        let prefixes: Vec<IpNet> = prefixes
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if prefixes.len() > MAX_ROUTES {
            return Err(StoreError::Invalid(format!(
                "{} auto-approve prefixes given; at most {MAX_ROUTES} fit: use shorter prefixes that cover several",
                prefixes.len()
            )));
        }
        let tx = self.conn.transaction()?;
        let (network_id, _) = network_by_name(&tx, network)?;
        tx.execute(
            "UPDATE networks SET auto_approve_routes = ?1 WHERE id = ?2",
            params![encode_auto(&prefixes), network_id],
        )?;
        let mut routes = load(&tx, network_id)?;
        for i in 0..routes.len() {
            let route = &routes[i];
            let covered = prefixes.iter().any(|a| a.contains(&route.prefix));
            if route.state != RouteStatus::Pending || !covered {
                continue;
            }
            let conflict = routes.iter().any(|r| {
                r.key != route.key
                    && r.state == RouteStatus::Approved
                    && overlaps(r.prefix, route.prefix)
            });
            if conflict {
                continue;
            }
            tx.execute(
                "UPDATE routes SET state = 'approved', decided_at = ?1, decided_by = ?2
                 WHERE id = ?3",
                params![now as i64, AUTO_APPROVER, route.id],
            )?;
            routes[i].state = RouteStatus::Approved;
        }
        tx.commit()?;
        Ok(())
    }
}

/// The ids and prefixes of the routes `key` advertises in the network (`None`: a prefix that
/// does not parse, never written so).
fn routes_of(
    conn: &Conn,
    network_id: i64,
    key: &str,
) -> Result<Vec<(i64, Option<IpNet>, bool)>, StoreError> {
    let mut st =
        conn.prepare("SELECT id, prefix, exit FROM routes WHERE network_id = ?1 AND key = ?2")?;
    let rows = st.query_map(params![network_id, key], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, bool>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, prefix, exit) = row?;
        out.push((id, prefix.parse().ok(), exit));
    }
    Ok(out)
}

/// Schema 5: whether a route is offered as an exit.
pub(super) fn migrate_exits(tx: &Conn) -> Result<(), StoreError> {
    super::add_column(tx, "routes", "exit", "INTEGER NOT NULL DEFAULT 0")?;
    Ok(())
}

fn is_live(conn: &Conn, network_id: i64, key: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare("SELECT 1 FROM nodes WHERE network_id = ?1 AND key = ?2 AND removed_at IS NULL")?
        .exists(params![network_id, key])?)
}

/// The routes' schema (version 4): the table and the network's policy column.
pub(super) fn migrate(tx: &Conn) -> Result<(), StoreError> {
    super::add_column(tx, "networks", "auto_approve_routes", "TEXT")?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS routes (
            id INTEGER PRIMARY KEY,
            network_id INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            prefix TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            reason TEXT,
            advertised_at INTEGER NOT NULL,
            decided_at INTEGER,
            decided_by TEXT,
            UNIQUE (network_id, key, prefix)
        );
        CREATE INDEX IF NOT EXISTS routes_by_network ON routes (network_id, state);",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, key, sqlite_store, store, T0};
    use super::*;

    const ADMIN: &str = "alice";
    const NET: i64 = 1;

    fn p(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ps(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| p(t)).collect()
    }

    fn entries(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    /// Node `n` advertises `prefixes` at `now`; whether anything changed.
    fn advertise(s: &mut Store, n: u8, prefixes: &[&str], now: u64) -> bool {
        s.advertise_routes(NET, &key(n), &ps(prefixes), now)
            .unwrap()
    }

    /// `(node, prefix, state)` of every route of `prod`, by prefix.
    fn table(s: &Store) -> Vec<(String, String, String)> {
        s.routes("prod")
            .unwrap()
            .into_iter()
            .map(|r| (r.node, r.prefix, r.state))
            .collect()
    }

    fn row(node: &str, prefix: &str, state: &str) -> (String, String, String) {
        (node.to_owned(), prefix.to_owned(), state.to_owned())
    }

    /// The route of `prod` with this prefix and node.
    fn route(s: &Store, node: &str, prefix: &str) -> RouteRow {
        s.routes("prod")
            .unwrap()
            .into_iter()
            .find(|r| r.node == node && r.prefix == prefix)
            .unwrap_or_else(|| panic!("no {prefix} of {node}: {:?}", table(s)))
    }

    fn invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
        match r {
            Err(StoreError::Invalid(message)) => message,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    fn peer_routes(s: &Store, name: &str) -> Vec<IpNet> {
        s.peers(NET)
            .unwrap()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap()
            .routes
    }

    #[test]
    fn prefixes_parse_with_errors_that_say_what_to_type() {
        assert_eq!(parse_prefix(" 10.244.0.0/16 "), Ok(p("10.244.0.0/16")));
        assert_eq!(
            parse_prefix("10.244.1.0/33").unwrap_err(),
            "10.244.1.0/33 is not an IP prefix (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)"
        );
        assert_eq!(
            parse_prefix("10.244.1.7/24").unwrap_err(),
            "10.244.1.7/24 has host bits set; did you mean 10.244.1.0/24?"
        );
        assert!(parse_prefix("10.244.1.0").is_err());
        assert_eq!(parse_prefix_list("none"), Ok(Vec::new()));
        assert_eq!(
            parse_prefix_list("10.245.0.0/16,10.244.0.0/16,10.244.0.0/16"),
            Ok(ps(&["10.244.0.0/16", "10.245.0.0/16"]))
        );
        assert_eq!(
            parse_prefix_list("fd00:10:244::/56,10.244.0.0/16"),
            Ok(ps(&["10.244.0.0/16", "fd00:10:244::/56"]))
        );
        let e = parse_prefix_list("10.244.0.0/16,fd00::1/8").unwrap_err();
        assert_eq!(e, "fd00::1/8 has host bits set; did you mean fd00::/8?");
        let e = parse_prefix_list("10.244.0.0/16,fd00::/129").unwrap_err();
        assert!(e.starts_with("fd00::/129 is not an IP prefix"), "{e}");
    }

    #[test]
    fn the_policy_approves_what_it_covers_and_the_rest_waits() {
        let (_d, mut s) = store();
        s.set_auto_approve_routes("prod", &ps(&["10.244.0.0/16"]), T0)
            .unwrap();
        join(&mut s, 1, "a").unwrap();
        assert!(advertise(
            &mut s,
            1,
            &["10.244.1.0/24", "192.168.5.0/24"],
            T0
        ));
        assert_eq!(
            table(&s),
            [
                row("a", "10.244.1.0/24", "approved"),
                row("a", "192.168.5.0/24", "pending")
            ]
        );
        let auto = route(&s, "a", "10.244.1.0/24");
        assert_eq!(auto.decided_by.as_deref(), Some("auto (network policy)"));
        assert_eq!(auto.decided_at, Some(rfc3339(T0)));
        assert_eq!(route(&s, "a", "192.168.5.0/24").decided_by, None);
        // The same list again changes nothing; peers get the approved prefix only.
        assert!(!advertise(
            &mut s,
            1,
            &["192.168.5.0/24", "10.244.1.0/24"],
            T0 + 1
        ));
        assert_eq!(peer_routes(&s, "a"), ps(&["10.244.1.0/24"]));
        let states = s.route_states(NET).unwrap();
        let mine = &states[&key(1)];
        assert_eq!(mine.len(), 2);
        assert_eq!(
            (mine[0].prefix, mine[0].state, mine[0].reason.as_deref()),
            (p("10.244.1.0/24"), RouteStatus::Approved, None)
        );
        assert_eq!(mine[1].state, RouteStatus::Pending);
        let why = mine[1].reason.as_deref().unwrap();
        assert!(
            why.contains("`mesh-controller route approve prod 192.168.5.0/24`"),
            "{why}"
        );
    }

    #[test]
    fn host_bits_are_cleared_and_duplicates_dropped() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        advertise(&mut s, 1, &["10.244.1.9/24", "10.244.1.0/24"], T0);
        assert_eq!(table(&s), [row("a", "10.244.1.0/24", "pending")]);
    }

    #[test]
    fn a_node_may_advertise_a_prefix_and_a_part_of_it() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        advertise(&mut s, 1, &["10.244.0.0/16", "10.244.1.0/24"], T0);
        assert_eq!(
            table(&s),
            [
                row("a", "10.244.0.0/16", "pending"),
                row("a", "10.244.1.0/24", "pending")
            ]
        );
    }

    #[test]
    fn overlaps_with_another_node_or_the_overlay_are_refused() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24"], T0);
        // Another node's pending prefix holds it...
        advertise(&mut s, 2, &["10.244.0.0/16", "100.64.0.0/24"], T0);
        let wide = route(&s, "b", "10.244.0.0/16");
        assert_eq!(wide.state, "refused");
        let why = wide.reason.unwrap();
        assert!(
            why.starts_with("overlaps 10.244.1.0/24 of node a (pending)"),
            "{why}"
        );
        assert_eq!(wide.decided_at, Some(rfc3339(T0)));
        let overlay = route(&s, "b", "100.64.0.0/24");
        assert_eq!(overlay.state, "refused");
        assert!(
            overlay
                .reason
                .unwrap()
                .starts_with("overlaps the network's overlay range 100.64.0.0/29"),
            "refused"
        );
        // ...and so does an approved one.
        s.approve_routes("prod", Who::These(&entries(&["a"])), ADMIN, T0)
            .unwrap();
        advertise(&mut s, 2, &["10.244.1.128/25"], T0 + 1);
        let half = route(&s, "b", "10.244.1.128/25");
        assert_eq!(half.state, "refused");
        let why = half.reason.unwrap();
        assert!(
            why.starts_with("overlaps 10.244.1.0/24 of node a (approved)"),
            "{why}"
        );
        // The node is told why.
        let states = s.route_states(NET).unwrap();
        assert_eq!(states[&key(2)][0].reason.as_deref(), Some(why.as_str()));
        assert!(peer_routes(&s, "b").is_empty());
    }

    #[test]
    fn exit_routes_and_ranges_never_routed_are_refused() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        // Even where the policy would approve everything.
        s.set_auto_approve_routes("prod", &ps(&["0.0.0.0/0"]), T0)
            .unwrap();
        let refused = [
            (
                "0.0.0.0/0",
                "offer it as an exit (`mesh up --advertise-exit 0.0.0.0/0`",
            ),
            ("10.0.0.0/7", "offer it as an exit"),
            ("127.0.0.0/8", "(loopback)"),
            ("169.254.0.0/16", "(link-local)"),
            ("169.0.0.0/8", "(link-local)"),
            ("239.1.0.0/16", "(multicast)"),
            ("0.0.0.0/8", "(\"this network\")"),
            ("255.255.255.255/32", "(reserved and broadcast)"),
        ];
        let all: Vec<&str> = refused.iter().map(|(r, _)| *r).collect();
        advertise(&mut s, 1, &all, T0);
        for (prefix, why) in refused {
            let r = route(&s, "a", prefix);
            assert_eq!(r.state, "refused", "{prefix}");
            assert!(
                r.reason.as_deref().unwrap().contains(why),
                "{prefix}: {r:?}"
            );
        }
    }

    #[test]
    fn ipv6_prefixes_follow_the_same_rules_against_their_own_family() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        let overlay6: Ipv6Net = s
            .conn
            .query_row("SELECT prefix6 FROM networks WHERE id = ?1", [NET], |r| {
                r.get::<_, String>(0)
            })
            .unwrap()
            .parse()
            .unwrap();
        let in_overlay6 = Ipv6Net::new(overlay6.network(), 72).unwrap().to_string();
        s.set_auto_approve_routes("prod", &ps(&["fd00:10:244::/48"]), T0)
            .unwrap();
        // The same bits in both families do not collide: a's IPv4 pods wait for the
        // administrator while its IPv6 pods are approved by the policy.
        advertise(&mut s, 1, &["fd00:10:244:1::/64", "10.244.1.0/24"], T0);
        assert_eq!(route(&s, "a", "fd00:10:244:1::/64").state, "approved");
        assert_eq!(route(&s, "a", "10.244.1.0/24").state, "pending");
        let refused = [
            (
                "fd00:10:244::/56",
                "overlaps fd00:10:244:1::/64 of node a (approved)",
            ),
            (
                in_overlay6.as_str(),
                &format!("overlaps the network's overlay range {overlay6}"),
            ),
            ("fe80::/64", "(link-local)"),
            ("ff02::/16", "(multicast)"),
            (
                "::1/128",
                "(reserved: unspecified, loopback and IPv4-mapped)",
            ),
            ("::ffff:10.244.2.0/120", "(reserved"),
            (
                "fc00::/7",
                "shorter than /16: offer it as an exit (`mesh up --advertise-exit fc00::/7`",
            ),
        ];
        let mut all: Vec<&str> = refused.iter().map(|(r, _)| *r).collect();
        all.push("fd00:10:244:2::/64");
        advertise(&mut s, 2, &all, T0);
        for (prefix, why) in refused {
            let r = route(&s, "b", prefix);
            assert_eq!(r.state, "refused", "{prefix}");
            assert!(
                r.reason.as_deref().unwrap().contains(why),
                "{prefix}: {r:?}"
            );
        }
        assert_eq!(route(&s, "b", "fd00:10:244:2::/64").state, "approved");
        assert_eq!(peer_routes(&s, "a"), ps(&["fd00:10:244:1::/64"]));
        assert_eq!(peer_routes(&s, "b"), ps(&["fd00:10:244:2::/64"]));
        // Exits: everything IPv6 may be offered, but not a part of the overlay.
        s.advertise(NET, &key(1), &[], &ps(&["::/0", &in_overlay6]), T0)
            .unwrap();
        let exit = route(&s, "a", "::/0");
        assert!(exit.exit && exit.state == "pending", "{exit:?}");
        let inside = route(&s, "a", &in_overlay6);
        assert!(
            inside.reason.unwrap().contains(&format!(
                "lies inside the network's overlay range {overlay6}"
            )),
            "refused"
        );
        // Withdrawing a's routes frees the wider IPv6 prefix for b, judged again.
        advertise(&mut s, 1, &[], T0 + 1);
        advertise(&mut s, 2, &all, T0 + 2);
        assert_eq!(route(&s, "b", "fd00:10:244::/56").state, "approved");
    }

    #[test]
    fn exits_are_approved_like_routes_overlap_anything_and_block_nothing() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        s.set_auto_approve_routes("prod", &ps(&["10.244.0.0/16"]), T0)
            .unwrap();
        // a offers everything as an exit, and a mirror range; b routes its pods.
        s.advertise(
            NET,
            &key(1),
            &[],
            &ps(&[
                "0.0.0.0/0",
                "198.51.100.0/24",
                "127.0.0.0/16",
                "100.64.0.0/30",
            ]),
            T0,
        )
        .unwrap();
        advertise(&mut s, 2, &["10.244.2.0/24"], T0);
        let exit = route(&s, "a", "0.0.0.0/0");
        assert!(exit.exit && exit.state == "pending", "{exit:?}");
        assert_eq!(route(&s, "a", "198.51.100.0/24").state, "pending");
        assert_eq!(route(&s, "b", "10.244.2.0/24").state, "approved");
        let inside = route(&s, "a", "127.0.0.0/16");
        assert!(inside.reason.unwrap().contains("never routed"));
        let overlay = route(&s, "a", "100.64.0.0/30");
        assert!(overlay
            .reason
            .unwrap()
            .contains("inside the network's overlay range"));
        // Approved by the administrator; handed to peers apart from routes.
        s.approve_routes(
            "prod",
            Who::These(&["0.0.0.0/0".into(), "198.51.100.0/24".into()]),
            ADMIN,
            T0,
        )
        .unwrap();
        let peers = s.peers(NET).unwrap();
        let a = peers.iter().find(|p| p.name == "a").unwrap();
        assert!(a.routes.is_empty());
        assert_eq!(a.exits, ps(&["0.0.0.0/0", "198.51.100.0/24"]));
        let states = s.route_states(NET).unwrap();
        assert!(states[&key(1)].iter().all(|r| r.exit));
        // The same prefix moved from exit to route is judged as a route.
        s.advertise(
            NET,
            &key(1),
            &ps(&["198.51.100.0/24"]),
            &ps(&["0.0.0.0/0"]),
            T0,
        )
        .unwrap();
        let moved = route(&s, "a", "198.51.100.0/24");
        assert!(!moved.exit && moved.state == "pending", "{moved:?}");
    }

    #[test]
    fn withdrawn_routes_go_and_free_the_refused_ones() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        join(&mut s, 3, "c").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24", "10.244.2.0/24"], T0);
        advertise(&mut s, 2, &["10.244.0.0/16"], T0 + 1);
        advertise(&mut s, 3, &["10.244.1.0/24"], T0 + 2);
        assert_eq!(route(&s, "b", "10.244.0.0/16").state, "refused");
        // One of a's routes goes: b's prefix still overlaps the other.
        assert!(advertise(&mut s, 1, &["10.244.2.0/24"], T0 + 3));
        assert_eq!(
            table(&s),
            [
                row("b", "10.244.0.0/16", "refused"),
                row("c", "10.244.1.0/24", "pending"),
                row("a", "10.244.2.0/24", "pending"),
            ],
            "c's prefix, free now, is pending; b's still overlaps a's and now c's"
        );
        // The policy changes meanwhile: what is freed later is approved at once.
        s.set_auto_approve_routes("prod", &ps(&["10.0.0.0/8"]), T0 + 4)
            .unwrap();
        assert_eq!(route(&s, "c", "10.244.1.0/24").state, "approved");
        assert_eq!(route(&s, "a", "10.244.2.0/24").state, "approved");
        assert!(advertise(&mut s, 1, &[], T0 + 5));
        assert!(advertise(&mut s, 3, &[], T0 + 6));
        let b = route(&s, "b", "10.244.0.0/16");
        assert_eq!(
            (b.state.as_str(), b.reason, b.decided_by.as_deref()),
            ("approved", None, Some("auto (network policy)"))
        );
        assert_eq!(table(&s).len(), 1, "withdrawn routes are deleted");
        assert!(!s.route_states(NET).unwrap().contains_key(&key(1)));
    }

    #[test]
    fn a_refused_route_is_judged_again_when_the_one_it_overlaps_is_rejected() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24"], T0);
        advertise(&mut s, 2, &["10.244.1.0/24"], T0);
        assert_eq!(route(&s, "b", "10.244.1.0/24").state, "refused");
        s.reject_routes("prod", Who::These(&entries(&["a"])), ADMIN, T0 + 1)
            .unwrap();
        assert_eq!(route(&s, "b", "10.244.1.0/24").state, "pending");
        assert_eq!(route(&s, "a", "10.244.1.0/24").state, "rejected");
    }

    #[test]
    fn a_rejected_route_stays_rejected_until_the_admin_approves_it() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24"], T0);
        let rejected = s
            .reject_routes(
                "prod",
                Who::These(&entries(&["10.244.1.0/24"])),
                "bob",
                T0 + 10,
            )
            .unwrap();
        assert_eq!(
            rejected
                .iter()
                .map(|r| (r.node.as_str(), r.prefix.as_str(), r.state.as_str()))
                .collect::<Vec<_>>(),
            [("a", "10.244.1.0/24", "rejected")]
        );
        // Advertised again with another prefix, and with a policy that covers it.
        s.set_auto_approve_routes("prod", &ps(&["10.244.0.0/16"]), T0 + 11)
            .unwrap();
        assert!(advertise(
            &mut s,
            1,
            &["10.244.1.0/24", "10.244.2.0/24"],
            T0 + 20
        ));
        assert_eq!(
            table(&s),
            [
                row("a", "10.244.1.0/24", "rejected"),
                row("a", "10.244.2.0/24", "approved")
            ]
        );
        let states = s.route_states(NET).unwrap();
        let why = states[&key(1)][0].reason.as_deref().unwrap();
        assert!(
            why.starts_with("rejected by bob at 2027-01-15T08:00:10Z"),
            "{why}"
        );
        assert_eq!(peer_routes(&s, "a"), ps(&["10.244.2.0/24"]));
        // The admin changes their mind.
        let approved = s
            .approve_routes(
                "prod",
                Who::These(&entries(&["10.244.1.0/24"])),
                ADMIN,
                T0 + 30,
            )
            .unwrap();
        assert_eq!(approved[0].state, "approved");
        assert_eq!(approved[0].decided_by.as_deref(), Some(ADMIN));
        assert_eq!(
            peer_routes(&s, "a"),
            ps(&["10.244.1.0/24", "10.244.2.0/24"])
        );
    }

    #[test]
    fn routes_are_approved_and_rejected_by_prefix_or_node_name_or_all() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        join(&mut s, 3, "c").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24", "10.244.10.0/24"], T0);
        advertise(&mut s, 2, &["10.244.2.0/24", "10.244.3.0/24"], T0);
        advertise(&mut s, 3, &["10.244.4.0/24"], T0);
        let approved = s
            .approve_routes(
                "prod",
                Who::These(&entries(&["a", " 10.244.2.9/24 "])),
                ADMIN,
                T0 + 1,
            )
            .unwrap();
        let names: Vec<(String, String)> =
            approved.into_iter().map(|r| (r.node, r.prefix)).collect();
        assert_eq!(
            names,
            [
                ("a".to_owned(), "10.244.1.0/24".to_owned()),
                ("a".to_owned(), "10.244.10.0/24".to_owned()),
                ("b".to_owned(), "10.244.2.0/24".to_owned()),
            ]
        );
        // Sorted as addresses, not as text.
        assert_eq!(
            peer_routes(&s, "a"),
            ps(&["10.244.1.0/24", "10.244.10.0/24"])
        );
        assert_eq!(
            route(&s, "a", "10.244.1.0/24").decided_at,
            Some(rfc3339(T0 + 1))
        );
        // An approved route may be rejected: its approval is withdrawn.
        s.reject_routes(
            "prod",
            Who::These(&entries(&["10.244.10.0/24"])),
            ADMIN,
            T0 + 2,
        )
        .unwrap();
        assert_eq!(peer_routes(&s, "a"), ps(&["10.244.1.0/24"]));
        // --all: every pending route, and only those.
        let all = s.reject_routes("prod", Who::All, ADMIN, T0 + 3).unwrap();
        let prefixes: Vec<&str> = all.iter().map(|r| r.prefix.as_str()).collect();
        assert_eq!(prefixes, ["10.244.3.0/24", "10.244.4.0/24"]);
        assert_eq!(route(&s, "b", "10.244.2.0/24").state, "approved");
        let e = invalid(s.approve_routes("prod", Who::All, ADMIN, T0 + 4));
        assert_eq!(
            e,
            "no pending routes in network \"prod\" to approve; see `mesh-controller route list prod`"
        );
    }

    #[test]
    fn entries_that_match_nothing_or_cannot_be_decided_are_errors_and_nothing_changes() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24", "10.244.5.0/24"], T0);
        advertise(&mut s, 2, &["10.244.1.0/24"], T0);
        let see = "see `mesh-controller route list prod`";
        let approve = |s: &mut Store, list: &[&str]| {
            s.approve_routes("prod", Who::These(&entries(list)), ADMIN, T0 + 1)
        };
        let e = invalid(approve(&mut s, &["10.244.5.0/24", "10.9.0.0/16"]));
        assert_eq!(
            e,
            format!("no node advertises 10.9.0.0/16 in network \"prod\"; {see}")
        );
        assert_eq!(
            route(&s, "a", "10.244.5.0/24").state,
            "pending",
            "all or none"
        );
        let e = invalid(approve(&mut s, &["nobody"]));
        assert!(
            e.starts_with("no route or node with routes matches \"nobody\""),
            "{e}"
        );
        assert!(e.ends_with(see), "{e}");
        let e = invalid(approve(&mut s, &["10.244.1.0/33"]));
        assert!(e.contains("is not an IP prefix"), "{e}");
        // A refused route cannot be approved, and the error says why.
        let e = invalid(approve(&mut s, &["b"]));
        assert!(
            e.starts_with("node b has no pending routes to approve"),
            "{e}"
        );
        s.reject_routes("prod", Who::These(&entries(&["10.244.5.0/24"])), ADMIN, T0)
            .unwrap();
        let e =
            invalid(s.reject_routes("prod", Who::These(&entries(&["10.244.5.0/24"])), ADMIN, T0));
        assert!(e.contains("10.244.5.0/24 of a is rejected already"), "{e}");
        let e = invalid(s.approve_routes("prod", Who::These(&[]), ADMIN, T0));
        assert!(e.contains("--all"), "{e}");
        let e = invalid(s.approve_routes("nope", Who::All, ADMIN, T0));
        assert!(e.contains("no network named \"nope\""), "{e}");
        // b's copy is refused while a's is pending.
        advertise(&mut s, 1, &["10.244.1.0/24"], T0 + 2);
        s.reject_routes("prod", Who::These(&entries(&["a"])), ADMIN, T0 + 3)
            .unwrap();
        assert_eq!(route(&s, "b", "10.244.1.0/24").state, "pending");
        approve(&mut s, &["b"]).unwrap();
        // Now a's rejected copy overlaps b's approved one: refused, both named.
        let e = invalid(approve(&mut s, &["a"]));
        assert!(e.starts_with("node a has no pending routes"), "{e}");
        advertise(&mut s, 1, &["10.244.1.0/24", "10.244.0.0/16"], T0 + 4);
        assert_eq!(route(&s, "a", "10.244.0.0/16").state, "refused");
        let e = invalid(approve(&mut s, &["10.244.0.0/16"]));
        assert!(
            e.starts_with("cannot approve 10.244.0.0/16 of a: the controller refused it (overlaps 10.244.1.0/24 of node b (approved)"),
            "{e}"
        );
    }

    #[test]
    fn approving_a_prefix_that_overlaps_an_approved_one_names_both() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24", "10.250.0.0/16"], T0);
        s.reject_routes("prod", Who::These(&entries(&["10.244.1.0/24"])), ADMIN, T0)
            .unwrap();
        // A rejected prefix holds nothing: b's wider one is pending, then approved.
        advertise(&mut s, 2, &["10.244.0.0/16"], T0 + 1);
        s.approve_routes("prod", Who::These(&entries(&["b"])), ADMIN, T0 + 2)
            .unwrap();
        let e = invalid(s.approve_routes(
            "prod",
            Who::These(&entries(&["10.250.0.0/16", "10.244.1.0/24"])),
            ADMIN,
            T0 + 3,
        ));
        assert_eq!(
            e,
            "cannot approve 10.244.1.0/24 of a: it overlaps 10.244.0.0/16 of b, which is approved, and one node routes each address; reject that one first (`mesh-controller route reject prod 10.244.0.0/16`); nothing was approved"
        );
        assert_eq!(
            route(&s, "a", "10.250.0.0/16").state,
            "pending",
            "all or none"
        );
    }

    #[test]
    fn only_members_advertise_and_no_more_than_the_wire_carries() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        let e = invalid(s.advertise_routes(NET, &key(9), &ps(&["10.244.1.0/24"]), T0));
        assert!(e.contains("only members advertise routes"), "{e}");
        let many: Vec<IpNet> = (0..=MAX_ROUTES as u8)
            .map(|i| IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, 200, i, 0), 24)))
            .collect();
        let e = invalid(s.advertise_routes(NET, &key(1), &many, T0));
        assert!(e.contains("at most 64"), "{e}");
        assert!(table(&s).is_empty());
        s.remove_node("prod", "a", T0).unwrap();
        let e = invalid(s.advertise_routes(NET, &key(1), &ps(&["10.244.1.0/24"]), T0));
        assert!(e.contains("not a member"), "{e}");
    }

    #[test]
    fn removed_or_departed_nodes_lose_their_routes_and_free_others() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        join(&mut s, 2, "b").unwrap();
        join(&mut s, 3, "c").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24"], T0);
        advertise(&mut s, 2, &["10.244.1.0/24"], T0);
        advertise(&mut s, 3, &["10.244.3.0/24"], T0);
        s.remove_node("prod", "a", T0 + 1).unwrap();
        assert_eq!(
            table(&s),
            [
                row("b", "10.244.1.0/24", "pending"),
                row("c", "10.244.3.0/24", "pending")
            ]
        );
        // Joining again, it starts with nothing and advertises afresh.
        join(&mut s, 1, "a").unwrap();
        assert!(!s.route_states(NET).unwrap().contains_key(&key(1)));
        advertise(&mut s, 1, &["10.244.1.0/24"], T0 + 2);
        assert_eq!(route(&s, "a", "10.244.1.0/24").state, "refused");
        s.leave(NET, &key(3), T0 + 3).unwrap();
        assert!(s.routes("prod").unwrap().iter().all(|r| r.node != "c"));
    }

    #[test]
    fn a_new_policy_approves_the_pending_routes_it_covers() {
        let (_d, mut s) = store();
        join(&mut s, 1, "a").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24", "192.168.0.0/24"], T0);
        s.set_auto_approve_routes("prod", &ps(&["10.244.0.0/16", "10.245.0.0/16"]), T0 + 5)
            .unwrap();
        assert_eq!(
            s.networks().unwrap()[0].auto_approve_routes,
            ["10.244.0.0/16", "10.245.0.0/16"]
        );
        let r = route(&s, "a", "10.244.1.0/24");
        assert_eq!(
            (r.state.as_str(), r.decided_by.as_deref(), r.decided_at),
            (
                "approved",
                Some("auto (network policy)"),
                Some(rfc3339(T0 + 5))
            )
        );
        assert_eq!(route(&s, "a", "192.168.0.0/24").state, "pending");
        // Back to none: what was approved stays approved.
        s.set_auto_approve_routes("prod", &[], T0 + 6).unwrap();
        assert!(s.networks().unwrap()[0].auto_approve_routes.is_empty());
        assert_eq!(route(&s, "a", "10.244.1.0/24").state, "approved");
        let e = invalid(s.set_auto_approve_routes(
            "prod",
            &[IpNet::V4(Ipv4Net::new_assert(
                Ipv4Addr::new(10, 244, 1, 1),
                24,
            ))],
            T0,
        ));
        assert_eq!(
            e,
            "10.244.1.1/24 has host bits set; did you mean 10.244.1.0/24?"
        );
        let e = invalid(s.set_auto_approve_routes("nope", &[], T0));
        assert!(e.contains("no network named \"nope\""), "{e}");
    }

    #[test]
    fn a_database_of_the_previous_schema_gets_the_routes_table_once() {
        let (d, mut s) = sqlite_store();
        join(&mut s, 1, "a").unwrap();
        advertise(&mut s, 1, &["10.244.1.0/24"], T0);
        // Reopened as if the last migration step had not run: it runs again, harmlessly.
        s.conn
            .as_sqlite()
            .unwrap()
            .pragma_update(None, "user_version", 3)
            .unwrap();
        drop(s);
        let s = Store::open(&d.0.join("state.db")).unwrap();
        assert_eq!(table(&s), [row("a", "10.244.1.0/24", "pending")]);
        // A version-3 database has neither the column nor the table.
        s.conn
            .execute_batch(
                "DROP TABLE routes; ALTER TABLE networks DROP COLUMN auto_approve_routes;
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        drop(s);
        let s = Store::open(&d.0.join("state.db")).unwrap();
        assert!(table(&s).is_empty());
        assert!(s.networks().unwrap()[0].auto_approve_routes.is_empty());
    }
}
