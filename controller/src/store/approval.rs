//! Joins by network id: a node without a token asks to join (`mesh join meshnet1_...`), and
//! its request waits for the administrator, unless the network approves automatically.
//!
//! A request is one row of `join_requests`, one per network and node key:
//! - `pending`: waiting for the administrator. It lapses [`REQUEST_LIFETIME_SECS`] after the
//!   node first asked, or earlier when newer requests push it out of the caps
//!   ([`MAX_PENDING_PER_SOURCE`] per network and source address, [`MAX_PENDING_PER_NETWORK`]
//!   per network): a flood of requests from made-up keys keeps the table bounded.
//! - approved ([`Store::approve`]): the row goes and the key is a member, admitted as a token
//!   would admit it.
//! - `rejected` ([`Store::reject`]): the key is refused at once for [`REJECT_COOLDOWN_SECS`];
//!   then the row goes and the node may ask again.
//!
//! Lapsed rows are deleted by the next request or decision; nothing sweeps on a timer. A node
//! waiting on its connection learns the outcome from [`Store::request_state`].

use super::sql::{params, Conn, OptionalExtension};
use super::{
    admit, network_by_name, record_approval, refused, rfc3339, welcome_back, Admission, Candidates,
    NameRequest, Store, StoreError,
};
use mesh_proto::control::ErrorCode;
use mesh_proto::PublicKey;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A pending request lapses this long after the node first asked.
pub const REQUEST_LIFETIME_SECS: u64 = 24 * 3600;
/// A rejected key is refused at once for this long after the rejection; then it may ask again.
pub const REJECT_COOLDOWN_SECS: u64 = 3600;
/// Most pending requests a network keeps; the oldest go first.
pub const MAX_PENDING_PER_NETWORK: usize = 1000;
/// Most pending requests a network keeps from one source address; the oldest go first.
pub const MAX_PENDING_PER_SOURCE: usize = 32;

/// Who admitted a node that a network with [`Approval::Auto`] let in.
pub(super) const AUTO_APPROVER: &str = "auto (network policy)";

/// Whether a network's join requests wait for the administrator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// The administrator approves or rejects each request (`mesh-controller node approve`).
    #[default]
    Manual,
    /// Every request is admitted at once, as if it held a reusable token.
    Auto,
}

impl Approval {
    /// The text form, as stored and typed: `manual` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Approval::Manual => "manual",
            Approval::Auto => "auto",
        }
    }

    /// The stored form; anything unknown is read as the safe choice, `manual`.
    pub(super) fn from_column(text: &str) -> Approval {
        text.parse().unwrap_or(Approval::Manual)
    }
}

impl std::str::FromStr for Approval {
    type Err = String;

    fn from_str(s: &str) -> Result<Approval, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "manual" => Ok(Approval::Manual),
            "auto" => Ok(Approval::Auto),
            _ => Err(format!(
                "{s:?} is not an approval policy: use manual (the administrator approves each join request) or auto (every request is admitted)"
            )),
        }
    }
}

impl std::fmt::Display for Approval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's request to join a network by its id, as the controller received it.
#[derive(Debug, Clone, Copy)]
pub struct JoinRequest<'a> {
    /// The network asked for, by name.
    pub network: &'a str,
    /// The node's key (from the Noise handshake).
    pub key: &'a PublicKey,
    /// The name it asks for, and whether the user chose it.
    pub name: NameRequest<'a>,
    /// The machine's hostname, shown to the administrator (may be empty).
    pub hostname: &'a str,
    /// The IP address the request came from, for the per-source cap (`None`: not known; all
    /// such requests share one cap).
    pub source: Option<IpAddr>,
    /// Where the node says it can be reached, and where its connection comes from.
    pub seen: Candidates<'a>,
}

/// What became of a join request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The node is a member (it was already, or the network approves automatically): answer
    /// with a `Welcome` built from the admission.
    Admitted(Admission),
    /// Recorded and waiting for the administrator: answer `Pending` and keep the connection
    /// open, asking [`Store::request_state`] whenever the database changes.
    Pending {
        /// The network's id, for [`Store::request_state`].
        network_id: i64,
        /// The name the request is recorded under (the administrator approves it by it).
        name: String,
        /// Older requests this one pushed out of the caps: their nodes, if still waiting,
        /// find their request [`RequestState::Gone`].
        dropped: usize,
    },
}

/// A pending request as `mesh-controller node pending` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingRow {
    /// The name it asks for.
    pub name: String,
    /// The node's key.
    pub key: PublicKey,
    /// The key's fingerprint, which the node's `mesh status` shows too.
    pub fingerprint: String,
    /// The machine's hostname as the node reported it (may be empty).
    pub hostname: String,
    /// The IP address the request came from, if known.
    pub source: Option<String>,
    /// When the node first asked, RFC 3339 UTC.
    pub first_seen: String,
    /// When it last asked, RFC 3339 UTC.
    pub last_seen: String,
    /// The user chose the name (`mesh join --name`): if another node holds it when the
    /// request is approved, the approval is refused instead of giving `name-2`.
    pub exact_name: bool,
}

/// Which pending requests an approval or a rejection is about.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// Every pending request of the network.
    All,
    /// Each entry names one request: by its name, its full key (base64), or its key's
    /// fingerprint (any case, dashes optional).
    These(&'a [String]),
}

/// A node admitted by [`Store::approve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approved {
    /// Its name (`name-2` when its hostname was taken).
    pub name: String,
    /// Its key.
    pub key: PublicKey,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// Its IPv6 overlay address, if the network has an IPv6 overlay.
    pub address6: Option<std::net::Ipv6Addr>,
}

/// A request refused by [`Store::reject_requests`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The name it asked for.
    pub name: String,
    /// The node's key.
    pub key: PublicKey,
}

/// Where a node's join request stands, for the connection that waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState {
    /// Still waiting: keep the connection open.
    Pending,
    /// The key is a member now: answer with a `Welcome` ([`Store::hello`] gives the admission).
    Approved,
    /// The administrator rejected it: send [`ErrorCode::Rejected`] with
    /// [`rejection_message`] and close.
    Rejected {
        /// When, Unix seconds.
        at: u64,
        /// Who (the administrator's user name).
        by: String,
    },
    /// No request any more (it lapsed, newer ones pushed it out, or the node never asked):
    /// send [`ErrorCode::RequestDropped`] and close; the node may ask again.
    Gone,
}

/// What a node whose request was rejected at `at` is told.
pub fn rejection_message(network: &str, at: u64) -> String {
    format!(
        "the administrator rejected this node's request to join network {network:?} at {}; ask the administrator to approve it: this node can ask again after {} (run `mesh join` with the network id again)",
        rfc3339(at),
        rfc3339(at.saturating_add(REJECT_COOLDOWN_SECS))
    )
}

/// A pending request as read from the table.
struct Waiting {
    key: PublicKey,
    name: String,
    exact_name: bool,
    hostname: String,
    source: Option<String>,
    endpoints: Vec<SocketAddr>,
    observed: Option<SocketAddr>,
    first_seen: u64,
    last_seen: u64,
}

impl Waiting {
    /// How the administrator tells this request from another: fingerprint, hostname, source.
    fn describe(&self) -> String {
        let hostname = if self.hostname.is_empty() {
            "no hostname"
        } else {
            &self.hostname
        };
        let source = self.source.as_deref().unwrap_or("an unknown address");
        format!(
            "fingerprint {} (hostname {hostname}, from {source})",
            self.key.fingerprint()
        )
    }
}

impl Store {
    /// Sets whether join requests to `network` wait for the administrator. Requests already
    /// pending stay pending: approve them (`mesh-controller node approve NETWORK --all`), or
    /// their nodes are admitted when they ask again.
    pub fn set_approval(&self, network: &str, approval: Approval) -> Result<(), StoreError> {
        let (id, _) = self.network(network)?;
        self.conn.execute(
            "UPDATE networks SET approval = ?1 WHERE id = ?2",
            params![approval.as_str(), id],
        )?;
        Ok(())
    }

    /// Handles a node's request to join a network by its id, in one transaction: a member is
    /// welcomed back as by [`Store::hello`]; a key rejected within [`REJECT_COOLDOWN_SECS`] is
    /// refused ([`ErrorCode::Rejected`]); a network with [`Approval::Auto`] admits the node at
    /// once; otherwise the request is recorded (or refreshed, keeping when the node first
    /// asked) and waits, and the oldest requests beyond the caps are dropped.
    pub fn request_join(
        &mut self,
        req: &JoinRequest<'_>,
        now: u64,
    ) -> Result<RequestOutcome, StoreError> {
        // The wire decoder checks these too; they end up in the administrator's terminal.
        let name = req.name.name();
        if !mesh_proto::control::valid_node_name(name) {
            return Err(refused(
                ErrorCode::BadRequest,
                format!("invalid node name {name:?}: Kubernetes takes 1-63 lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit (mesh join --name)"),
            ));
        }
        if !req.hostname.is_empty() && !mesh_proto::control::valid_hostname(req.hostname) {
            return Err(refused(
                ErrorCode::BadRequest,
                "the hostname sent is not a valid hostname (letters, digits, '-', '_' and '.')",
            ));
        }
        let tx = self.conn.transaction()?;
        prune(&tx, now)?;
        let network: Option<(i64, String, u32, u8)> = tx
            .query_row(
                "SELECT id, approval, network, prefix_len FROM networks WHERE name = ?1",
                [req.network],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((network_id, approval, net, prefix_len)) = network else {
            return Err(refused(
                ErrorCode::NetworkUnknown,
                format!(
                    "network {:?} does not exist on this controller; ask the administrator for the current network id (`mesh-controller network id NETWORK`)",
                    req.network
                ),
            ));
        };
        if let Some(admission) = welcome_back(&tx, req.network, req.key, req.seen, now)? {
            tx.commit()?;
            return Ok(RequestOutcome::Admitted(admission));
        }
        let key = req.key.to_string();
        let rejected_at: Option<i64> = tx
            .query_row(
                "SELECT decided_at FROM join_requests
                 WHERE network_id = ?1 AND key = ?2 AND state = 'rejected'",
                params![network_id, key],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        // Rows past the cooldown were pruned above: what is left is within it.
        if let Some(at) = rejected_at {
            return Err(refused(
                ErrorCode::Rejected,
                rejection_message(req.network, at as u64),
            ));
        }
        if Approval::from_column(&approval) == Approval::Auto {
            let admission = admit(&tx, network_id, req.key, req.name, req.seen, now)?;
            record_approval(&tx, network_id, req.key, AUTO_APPROVER, now)?;
            forget_request(&tx, network_id, req.key)?;
            tx.commit()?;
            return Ok(RequestOutcome::Admitted(admission));
        }
        let overlay = (Ipv4Addr::from(net), prefix_len);
        let observed = req
            .seen
            .observed
            .and_then(|o| crate::netmap::usable_observed(o, overlay));
        let (endpoints, _) = crate::netmap::filter_reported(req.seen.reported, observed, overlay);
        let source = req.source.map(|ip| ip.to_canonical().to_string());
        let id: i64 = tx.query_row(
            "INSERT INTO join_requests (network_id, key, name, exact_name, hostname, source,
                 endpoints, observed, first_seen, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
             ON CONFLICT (network_id, key) DO UPDATE SET name = ?3, exact_name = ?4,
                 hostname = ?5, source = ?6, endpoints = ?7, observed = ?8, last_seen = ?9
             RETURNING id",
            params![
                network_id,
                key,
                name,
                matches!(req.name, NameRequest::Exact(_)),
                req.hostname,
                source,
                super::endpoints_json(&endpoints),
                observed.map(|o| o.to_string()),
                now as i64,
            ],
            |r| r.get(0),
        )?;
        let dropped = enforce_caps(&tx, network_id, source.as_deref(), id)?;
        tx.commit()?;
        Ok(RequestOutcome::Pending {
            network_id,
            name: name.to_owned(),
            dropped,
        })
    }

    /// The pending requests of `network` that have not lapsed, oldest first.
    pub fn pending(&self, network: &str, now: u64) -> Result<Vec<PendingRow>, StoreError> {
        let (network_id, _) = self.network(network)?;
        Ok(waiting(&self.conn, network_id, now)?
            .into_iter()
            .map(|w| PendingRow {
                fingerprint: w.key.fingerprint(),
                name: w.name,
                key: w.key,
                hostname: w.hostname,
                source: w.source,
                first_seen: rfc3339(w.first_seen),
                last_seen: rfc3339(w.last_seen),
                exact_name: w.exact_name,
            })
            .collect())
    }

    /// Admits the pending requests `who` names, all or none, each as a token would: under the
    /// name it asked for (`name-2` when another node holds it, unless the user chose the name,
    /// which refuses the approval), with the endpoints it reported. Records `by` as who
    /// approved them. The nodes are recorded as not connected; a connection that waits on its
    /// request marks its node when it welcomes it.
    pub fn approve(
        &mut self,
        network: &str,
        who: Who<'_>,
        by: &str,
        now: u64,
    ) -> Result<Vec<Approved>, StoreError> {
        let tx = self.conn.transaction()?;
        prune(&tx, now)?;
        let (network_id, _) = network_by_name(&tx, network)?;
        let waiting = waiting(&tx, network_id, now)?;
        let mut approved = Vec::new();
        for w in choose(&tx, network, network_id, &waiting, who, "approve")? {
            let name = if w.exact_name {
                NameRequest::Exact(&w.name)
            } else {
                NameRequest::Preferred(&w.name)
            };
            let seen = Candidates {
                reported: &w.endpoints,
                observed: w.observed,
            };
            let admission =
                admit(&tx, network_id, &w.key, name, seen, now).map_err(|e| match e {
                    StoreError::Refused { message, .. } => StoreError::Invalid(format!(
                        "cannot approve {} ({}): {message}; nothing was approved",
                        w.name,
                        w.describe()
                    )),
                    e => e,
                })?;
            tx.execute(
                "UPDATE nodes SET connected = 0 WHERE network_id = ?1 AND key = ?2",
                params![network_id, w.key.to_string()],
            )?;
            record_approval(&tx, network_id, &w.key, by, now)?;
            forget_request(&tx, network_id, &w.key)?;
            approved.push(Approved {
                name: admission.name,
                key: w.key,
                address: admission.address,
                address6: admission.address6,
            });
        }
        tx.commit()?;
        Ok(approved)
    }

    /// Rejects the pending requests `who` names, all or none; the names they asked for. See
    /// [`Store::reject_requests`].
    pub fn reject(
        &mut self,
        network: &str,
        who: Who<'_>,
        by: &str,
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .reject_requests(network, who, by, now)?
            .into_iter()
            .map(|r| r.name)
            .collect())
    }

    /// Rejects the pending requests `who` names, all or none: their keys are refused at once
    /// for [`REJECT_COOLDOWN_SECS`], and a node still waiting is told so. Records `by` as who
    /// rejected them.
    pub fn reject_requests(
        &mut self,
        network: &str,
        who: Who<'_>,
        by: &str,
        now: u64,
    ) -> Result<Vec<Rejected>, StoreError> {
        let tx = self.conn.transaction()?;
        prune(&tx, now)?;
        let (network_id, _) = network_by_name(&tx, network)?;
        let waiting = waiting(&tx, network_id, now)?;
        let mut rejected = Vec::new();
        for w in choose(&tx, network, network_id, &waiting, who, "reject")? {
            tx.execute(
                "UPDATE join_requests SET state = 'rejected', decided_at = ?1, decided_by = ?2
                 WHERE network_id = ?3 AND key = ?4",
                params![now as i64, by, network_id, w.key.to_string()],
            )?;
            rejected.push(Rejected {
                name: w.name.clone(),
                key: w.key,
            });
        }
        tx.commit()?;
        Ok(rejected)
    }

    /// Where the join request of `key` in the network stands at `now`. Two lookups by unique
    /// index, cheap enough to ask for every waiting connection whenever the database changes.
    pub fn request_state(
        &self,
        network_id: i64,
        key: &PublicKey,
        now: u64,
    ) -> Result<RequestState, StoreError> {
        if self.is_member(network_id, key)? {
            return Ok(RequestState::Approved);
        }
        let row: Option<(String, i64, Option<i64>, Option<String>)> = self
            .conn
            .query_row(
                "SELECT state, first_seen, decided_at, decided_by FROM join_requests
                 WHERE network_id = ?1 AND key = ?2",
                params![network_id, key.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        Ok(match row {
            Some((state, first_seen, _, _))
                if state == "pending" && now < lapses(first_seen, REQUEST_LIFETIME_SECS) =>
            {
                RequestState::Pending
            }
            Some((state, _, Some(at), by))
                if state == "rejected" && now < lapses(at, REJECT_COOLDOWN_SECS) =>
            {
                RequestState::Rejected {
                    at: at as u64,
                    by: by.unwrap_or_default(),
                }
            }
            _ => RequestState::Gone,
        })
    }
}

/// When something that happened at `at` (Unix seconds, as stored) and lasts `secs` is over.
fn lapses(at: i64, secs: u64) -> u64 {
    (at.max(0) as u64).saturating_add(secs)
}

/// Deletes the pending requests that lapsed and the rejections past their cooldown, in every
/// network.
fn prune(conn: &Conn, now: u64) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM join_requests WHERE state = 'pending' AND first_seen <= ?1",
        [now.saturating_sub(REQUEST_LIFETIME_SECS) as i64],
    )?;
    conn.execute(
        "DELETE FROM join_requests WHERE state = 'rejected' AND decided_at <= ?1",
        [now.saturating_sub(REJECT_COOLDOWN_SECS) as i64],
    )?;
    Ok(())
}

/// Deletes whatever request `key` has in the network: it was admitted another way.
pub(super) fn forget_request(
    conn: &Conn,
    network_id: i64,
    key: &PublicKey,
) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM join_requests WHERE network_id = ?1 AND key = ?2",
        params![network_id, key.to_string()],
    )?;
    Ok(())
}

/// Deletes the oldest pending requests of the network's `source` beyond
/// [`MAX_PENDING_PER_SOURCE`], then of the network beyond [`MAX_PENDING_PER_NETWORK`]; never
/// the request `keep` (the one just written). How many went.
fn enforce_caps(
    conn: &Conn,
    network_id: i64,
    source: Option<&str>,
    keep: i64,
) -> Result<usize, StoreError> {
    let by_source: i64 = conn.query_row(
        "SELECT COUNT(*) FROM join_requests
         WHERE network_id = ?1 AND source IS NOT DISTINCT FROM ?2 AND state = 'pending'",
        params![network_id, source],
        |r| r.get(0),
    )?;
    let mut dropped = 0;
    let excess = by_source.saturating_sub(MAX_PENDING_PER_SOURCE as i64);
    if excess > 0 {
        dropped += conn.execute(
            "DELETE FROM join_requests WHERE id IN (
                 SELECT id FROM join_requests
                 WHERE network_id = ?1 AND source IS NOT DISTINCT FROM ?2 AND state = 'pending' AND id != ?3
                 ORDER BY first_seen, id LIMIT ?4)",
            params![network_id, source, keep, excess],
        )?;
    }
    let in_network: i64 = conn.query_row(
        "SELECT COUNT(*) FROM join_requests WHERE network_id = ?1 AND state = 'pending'",
        [network_id],
        |r| r.get(0),
    )?;
    let excess = in_network.saturating_sub(MAX_PENDING_PER_NETWORK as i64);
    if excess > 0 {
        dropped += conn.execute(
            "DELETE FROM join_requests WHERE id IN (
                 SELECT id FROM join_requests
                 WHERE network_id = ?1 AND state = 'pending' AND id != ?2
                 ORDER BY first_seen, id LIMIT ?3)",
            params![network_id, keep, excess],
        )?;
    }
    Ok(dropped)
}

/// The network's pending requests that have not lapsed at `now`, oldest first.
fn waiting(conn: &Conn, network_id: i64, now: u64) -> Result<Vec<Waiting>, StoreError> {
    let mut st = conn.prepare(
        "SELECT key, name, exact_name, hostname, source, endpoints, observed, first_seen,
                last_seen
         FROM join_requests
         WHERE network_id = ?1 AND state = 'pending' AND first_seen > ?2
         ORDER BY first_seen, id",
    )?;
    let lapsed = now.saturating_sub(REQUEST_LIFETIME_SECS) as i64;
    let rows = st.query_map(params![network_id, lapsed], |r| {
        // A key that does not parse (never written so) is left out.
        let Ok(key) = r.get::<_, String>(0)?.parse() else {
            return Ok(None);
        };
        Ok(Some(Waiting {
            key,
            name: r.get(1)?,
            exact_name: r.get(2)?,
            hostname: r.get(3)?,
            source: r.get(4)?,
            endpoints: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
            observed: r.get::<_, Option<String>>(6)?.and_then(|o| o.parse().ok()),
            first_seen: r.get::<_, i64>(7)?.max(0) as u64,
            last_seen: r.get::<_, i64>(8)?.max(0) as u64,
        }))
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

/// The pending requests `who` names, each once, in the order named (oldest first for
/// [`Who::All`]); an error that says what to do when an entry names none or several.
fn choose<'w>(
    conn: &Conn,
    network: &str,
    network_id: i64,
    waiting: &'w [Waiting],
    who: Who<'_>,
    verb: &str,
) -> Result<Vec<&'w Waiting>, StoreError> {
    let entries = match who {
        Who::All if waiting.is_empty() => {
            return Err(StoreError::Invalid(format!(
                "no pending requests in network {network:?} to {verb}; nodes ask to join with `mesh join` and the network id (`mesh-controller network id {network}`)"
            )))
        }
        Who::All => return Ok(waiting.iter().collect()),
        Who::These([]) => {
            return Err(StoreError::Invalid(format!(
                "name the requests to {verb} (by name, fingerprint or key, as `mesh-controller node pending {network}` lists them), or all of them with --all"
            )))
        }
        Who::These(entries) => entries,
    };
    let mut chosen: Vec<&Waiting> = Vec::new();
    for entry in entries {
        let w = find(conn, network, network_id, waiting, entry.trim(), verb)?;
        if !chosen.iter().any(|c| c.key == w.key) {
            chosen.push(w);
        }
    }
    Ok(chosen)
}

/// The one pending request `entry` names: by full key, else by fingerprint, else by name
/// (which two requests may claim: then the administrator must pick by fingerprint).
fn find<'w>(
    conn: &Conn,
    network: &str,
    network_id: i64,
    waiting: &'w [Waiting],
    entry: &str,
    verb: &str,
) -> Result<&'w Waiting, StoreError> {
    if let Ok(key) = entry.parse::<PublicKey>() {
        if let Some(w) = waiting.iter().find(|w| w.key == key) {
            return Ok(w);
        }
    }
    if let Some(digits) = fingerprint_digits(entry) {
        let same = |w: &&Waiting| {
            fingerprint_digits(&w.key.fingerprint()).as_deref() == Some(digits.as_str())
        };
        if let Some(w) = waiting.iter().find(same) {
            return Ok(w);
        }
    }
    let named: Vec<&Waiting> = waiting.iter().filter(|w| w.name == entry).collect();
    match named.as_slice() {
        [w] => Ok(w),
        [] => {
            let member: Option<String> = conn
                .query_row(
                    "SELECT name FROM nodes
                     WHERE network_id = ?1 AND removed_at IS NULL AND (name = ?2 OR key = ?2)",
                    params![network_id, entry],
                    |r| r.get(0),
                )
                .optional()?;
            let already = member.map_or(String::new(), |name| {
                format!(" ({name} is a member already: `mesh-controller node list {network}`)")
            });
            Err(StoreError::Invalid(format!(
                "no pending request matches {entry:?} in network {network:?}{already}; see `mesh-controller node pending {network}`"
            )))
        }
        several => {
            let claims: Vec<String> = several.iter().map(|w| w.describe()).collect();
            Err(StoreError::Invalid(format!(
                "the name {entry:?} is claimed by {} pending requests in network {network:?}: {}; compare the fingerprints with `mesh status` on each machine and {verb} by fingerprint, e.g. `mesh-controller node {verb} {network} {}`",
                several.len(),
                claims.join(", "),
                several[0].key.fingerprint()
            )))
        }
    }
}

/// A fingerprint as typed, reduced to its 16 lowercase hex digits (dashes and case ignored);
/// `None` if it is not one.
fn fingerprint_digits(text: &str) -> Option<String> {
    let digits: String = text
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{join, key, sqlite_store, store, T0};
    use super::*;

    const ADMIN: &str = "alice";

    /// A request from node `n` (key `key(n)`) asking for `name`, from `source`.
    fn request<'a>(
        network: &'a str,
        key: &'a PublicKey,
        name: NameRequest<'a>,
        source: &str,
    ) -> JoinRequest<'a> {
        JoinRequest {
            network,
            key,
            name,
            hostname: "host.example.net",
            source: Some(source.parse().unwrap()),
            seen: Candidates::default(),
        }
    }

    /// Node `n` asks to join `prod` as `name` (not a name the user chose) from 192.0.2.1.
    fn ask(s: &mut Store, n: u8, name: &str, now: u64) -> Result<RequestOutcome, StoreError> {
        let k = key(n);
        s.request_join(
            &request("prod", &k, NameRequest::Preferred(name), "192.0.2.1"),
            now,
        )
    }

    fn pending_names(s: &Store, now: u64) -> Vec<String> {
        s.pending("prod", now)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    fn names(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    fn invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
        match r {
            Err(StoreError::Invalid(message)) => message,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    fn refusal<T: std::fmt::Debug>(r: Result<T, StoreError>) -> (ErrorCode, String) {
        match r {
            Err(StoreError::Refused { code, message }) => (code, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn requests_in_table(s: &Store) -> i64 {
        s.conn
            .query_row("SELECT COUNT(*) FROM join_requests", params![], |r| {
                r.get(0)
            })
            .unwrap()
    }

    #[test]
    fn the_approval_policy_parses_shows_and_defaults_to_manual() {
        assert_eq!("manual".parse(), Ok(Approval::Manual));
        assert_eq!(" Auto ".parse(), Ok(Approval::Auto));
        let e = "yes".parse::<Approval>().unwrap_err();
        assert!(e.contains("use manual") && e.contains("or auto"), "{e}");
        assert_eq!(Approval::Auto.to_string(), "auto");
        assert_eq!(
            serde_json::to_string(&Approval::Manual).unwrap(),
            "\"manual\""
        );
        let (_d, s) = store();
        s.create_network_with(
            "open",
            "100.65.0.0/24".parse().unwrap(),
            None,
            Approval::Auto,
            T0,
        )
        .unwrap();
        let policy = |s: &Store, name: &str| {
            s.networks()
                .unwrap()
                .into_iter()
                .find(|n| n.name == name)
                .unwrap()
                .approval
        };
        assert_eq!(policy(&s, "prod"), Approval::Manual);
        assert_eq!(policy(&s, "open"), Approval::Auto);
        s.set_approval("prod", Approval::Auto).unwrap();
        s.set_approval("open", Approval::Manual).unwrap();
        assert_eq!(policy(&s, "prod"), Approval::Auto);
        assert_eq!(policy(&s, "open"), Approval::Manual);
        let e = invalid(s.set_approval("nope", Approval::Auto));
        assert!(e.contains("no network named \"nope\""), "{e}");
    }

    #[test]
    fn a_version_2_database_gains_the_approval_schema() {
        let (d, mut s) = sqlite_store();
        join(&mut s, 1, "a").unwrap();
        // What a controller of schema version 2 left.
        s.conn
            .execute_batch(
                "DROP TABLE join_requests;
                 ALTER TABLE networks DROP COLUMN approval;
                 ALTER TABLE nodes DROP COLUMN approved_by;
                 ALTER TABLE nodes DROP COLUMN approved_at;
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        drop(s);
        let mut s = Store::open(&d.0.join("state.db")).unwrap();
        assert_eq!(s.networks().unwrap()[0].approval, Approval::Manual);
        let a = &s.nodes("prod", T0).unwrap()[0];
        assert_eq!(
            (a.approved_by.as_deref(), a.approved_at.as_deref()),
            (None, None)
        );
        assert!(matches!(
            ask(&mut s, 2, "b", T0),
            Ok(RequestOutcome::Pending { .. })
        ));
        // Opening it again finds nothing to do.
        drop(s);
        let s = Store::open(&d.0.join("state.db")).unwrap();
        assert_eq!(pending_names(&s, T0), ["b"]);
    }

    #[test]
    fn a_request_for_an_unknown_network_says_to_ask_for_the_current_id() {
        let (_d, mut s) = store();
        let k = key(1);
        let r = s.request_join(
            &request("gone", &k, NameRequest::Preferred("a"), "192.0.2.1"),
            T0,
        );
        let (code, message) = refusal(r);
        assert_eq!(code, ErrorCode::NetworkUnknown);
        assert!(
            message.contains("\"gone\" does not exist on this controller"),
            "{message}"
        );
        assert!(
            message.contains("`mesh-controller network id NETWORK`"),
            "{message}"
        );
        assert_eq!(requests_in_table(&s), 0);
    }

    #[test]
    fn a_request_waits_and_asking_again_refreshes_it() {
        let (_d, mut s) = store();
        let outcome = ask(&mut s, 1, "web", T0).unwrap();
        let RequestOutcome::Pending {
            network_id,
            name,
            dropped,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!((name.as_str(), dropped), ("web", 0));
        assert_eq!(
            s.request_state(network_id, &key(1), T0).unwrap(),
            RequestState::Pending
        );
        assert!(s.nodes("prod", T0).unwrap().is_empty(), "not a member yet");
        // The node asks again, from elsewhere, under another name that the user chose.
        let k = key(1);
        let again = JoinRequest {
            hostname: "web01",
            ..request("prod", &k, NameRequest::Exact("www"), "::ffff:198.51.100.7")
        };
        s.request_join(&again, T0 + 60).unwrap();
        let rows = s.pending("prod", T0 + 60).unwrap();
        assert_eq!(
            rows,
            [PendingRow {
                name: "www".into(),
                key: key(1),
                fingerprint: key(1).fingerprint(),
                hostname: "web01".into(),
                // An IPv4 address seen through an IPv6 socket is shown as IPv4.
                source: Some("198.51.100.7".into()),
                first_seen: rfc3339(T0),
                last_seen: rfc3339(T0 + 60),
                exact_name: true,
            }]
        );
        let e = invalid(s.pending("nope", T0));
        assert!(e.contains("no network named"), "{e}");
    }

    #[test]
    fn a_pending_request_lapses_a_day_after_the_node_first_asked() {
        let (_d, mut s) = store();
        ask(&mut s, 1, "web", T0).unwrap();
        // Asking again does not extend it.
        ask(&mut s, 1, "web", T0 + REQUEST_LIFETIME_SECS - 10).unwrap();
        let last = T0 + REQUEST_LIFETIME_SECS - 1;
        assert_eq!(pending_names(&s, last), ["web"]);
        assert_eq!(
            s.request_state(1, &key(1), last).unwrap(),
            RequestState::Pending
        );
        let lapsed = T0 + REQUEST_LIFETIME_SECS;
        assert!(pending_names(&s, lapsed).is_empty());
        assert_eq!(
            s.request_state(1, &key(1), lapsed).unwrap(),
            RequestState::Gone
        );
        let e = invalid(s.approve("prod", Who::These(&names(&["web"])), ADMIN, lapsed));
        assert!(e.contains("no pending request matches \"web\""), "{e}");
        // Any later request prunes it, in every network; asking again starts a new one.
        ask(&mut s, 2, "db", lapsed).unwrap();
        assert_eq!(requests_in_table(&s), 1);
        ask(&mut s, 1, "web", lapsed + 5).unwrap();
        assert_eq!(
            s.pending("prod", lapsed + 5).unwrap()[1].first_seen,
            rfc3339(lapsed + 5)
        );
    }

    #[test]
    fn an_approved_request_makes_a_member_recorded_with_who_approved_it() {
        let (_d, mut s) = store();
        let reported = ["198.51.100.4:51820".parse().unwrap()];
        let k = key(1);
        let req = JoinRequest {
            seen: Candidates {
                reported: &reported,
                observed: Some("203.0.113.5:40000".parse().unwrap()),
            },
            ..request("prod", &k, NameRequest::Preferred("web"), "203.0.113.5")
        };
        s.request_join(&req, T0).unwrap();
        let approved = s
            .approve("prod", Who::These(&names(&["web"])), ADMIN, T0 + 30)
            .unwrap();
        assert_eq!(
            approved,
            [Approved {
                name: "web".into(),
                key: key(1),
                address: Ipv4Addr::new(100, 64, 0, 1),
                address6: s.nodes("prod", T0 + 30).unwrap()[0].address6,
            }]
        );
        let node = &s.nodes("prod", T0 + 30).unwrap()[0];
        assert!(
            node.address6.is_some(),
            "an approved node gets its IPv6 address too"
        );
        assert_eq!(node.approved_by.as_deref(), Some(ADMIN));
        assert_eq!(node.approved_at, Some(rfc3339(T0 + 30)));
        assert!(
            !node.online,
            "its connection marks it online when it welcomes it"
        );
        let peer = &s.peers(1).unwrap()[0];
        assert_eq!(peer.endpoints, reported);
        assert_eq!(peer.observed, req.seen.observed);
        assert!(pending_names(&s, T0 + 30).is_empty());
        assert_eq!(requests_in_table(&s), 0);
        assert_eq!(
            s.request_state(1, &key(1), T0 + 30).unwrap(),
            RequestState::Approved
        );
        // Asking again is a member's hello: no new request.
        let outcome = ask(&mut s, 1, "web", T0 + 40).unwrap();
        let RequestOutcome::Admitted(admission) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(admission.address, Ipv4Addr::new(100, 64, 0, 1));
        assert!(s.nodes("prod", T0 + 40).unwrap()[0].online);
        assert_eq!(requests_in_table(&s), 0);
        // A member is no pending request.
        let e = invalid(s.approve("prod", Who::These(&names(&["web"])), ADMIN, T0 + 50));
        assert!(
            e.contains(
                "no pending request matches \"web\" in network \"prod\" (web is a member already"
            ),
            "{e}"
        );
        assert!(e.contains("`mesh-controller node pending prod`"), "{e}");
    }

    #[test]
    fn requests_are_named_by_name_key_or_fingerprint_in_any_case_with_or_without_dashes() {
        let (_d, mut s) = store();
        for n in 1..=4 {
            ask(&mut s, n, &format!("n{n}"), T0).unwrap();
        }
        let fingerprint = key(2).fingerprint();
        let entries = names(&[
            "n1",
            &fingerprint.to_uppercase(),
            &key(3).fingerprint().replace('-', ""),
            &key(4).to_string(),
            // The same request twice is approved once.
            &fingerprint,
        ]);
        let approved = s.approve("prod", Who::These(&entries), ADMIN, T0).unwrap();
        let keys: Vec<PublicKey> = approved.iter().map(|a| a.key).collect();
        assert_eq!(keys, [key(1), key(2), key(3), key(4)]);
        let e = invalid(s.approve("prod", Who::These(&[]), ADMIN, T0));
        assert!(e.contains("--all"), "{e}");
    }

    #[test]
    fn a_name_two_requests_claim_is_refused_showing_both_fingerprints() {
        let (_d, mut s) = store();
        let (a, b) = (key(1), key(2));
        s.request_join(
            &request("prod", &a, NameRequest::Preferred("web"), "192.0.2.1"),
            T0,
        )
        .unwrap();
        let other = JoinRequest {
            hostname: "impostor",
            ..request("prod", &b, NameRequest::Preferred("web"), "198.51.100.9")
        };
        s.request_join(&other, T0 + 1).unwrap();
        for verb in ["approve", "reject"] {
            let who = names(&["web"]);
            let e = invalid(if verb == "approve" {
                s.approve("prod", Who::These(&who), ADMIN, T0 + 2).map(drop)
            } else {
                s.reject("prod", Who::These(&who), ADMIN, T0 + 2).map(drop)
            });
            assert!(
                e.contains("the name \"web\" is claimed by 2 pending requests in network \"prod\""),
                "{e}"
            );
            for expected in [
                format!(
                    "fingerprint {} (hostname host.example.net, from 192.0.2.1)",
                    a.fingerprint()
                ),
                format!(
                    "fingerprint {} (hostname impostor, from 198.51.100.9)",
                    b.fingerprint()
                ),
                format!("{verb} by fingerprint"),
                format!("`mesh-controller node {verb} prod {}`", a.fingerprint()),
            ] {
                assert!(e.contains(&expected), "{expected}: {e}");
            }
        }
        assert_eq!(pending_names(&s, T0 + 2), ["web", "web"], "nothing decided");
        s.reject("prod", Who::These(&[b.fingerprint()]), ADMIN, T0 + 3)
            .unwrap();
        let approved = s
            .approve("prod", Who::These(&names(&["web"])), ADMIN, T0 + 3)
            .unwrap();
        assert_eq!(approved[0].key, a);
    }

    #[test]
    fn an_approval_is_all_or_nothing() {
        let (_d, mut s) = store();
        ask(&mut s, 1, "a", T0).unwrap();
        ask(&mut s, 2, "b", T0).unwrap();
        let e = invalid(s.approve("prod", Who::These(&names(&["a", "zzz"])), ADMIN, T0));
        assert!(
            e.contains("no pending request matches \"zzz\" in network \"prod\"; see `mesh-controller node pending prod`"),
            "{e}"
        );
        assert!(s.nodes("prod", T0).unwrap().is_empty());
        assert_eq!(pending_names(&s, T0), ["a", "b"]);
        let e = invalid(s.reject("prod", Who::These(&names(&["b", "zzz"])), ADMIN, T0));
        assert!(e.contains("\"zzz\""), "{e}");
        assert_eq!(pending_names(&s, T0), ["a", "b"]);
        let e = invalid(s.approve("nope", Who::All, ADMIN, T0));
        assert!(e.contains("no network named \"nope\""), "{e}");
        let approved = s.approve("prod", Who::All, ADMIN, T0).unwrap();
        assert_eq!(approved.len(), 2);
        let e = invalid(s.approve("prod", Who::All, ADMIN, T0));
        assert!(
            e.contains("no pending requests in network \"prod\" to approve"),
            "{e}"
        );
        assert!(e.contains("`mesh-controller network id prod`"), "{e}");
        let e = invalid(s.reject("prod", Who::All, ADMIN, T0));
        assert!(e.contains("to reject"), "{e}");
    }

    #[test]
    fn an_approved_name_follows_the_token_rules() {
        let (_d, mut s) = store();
        let web = join(&mut s, 9, "web").unwrap();
        // A default name (the hostname) that is taken becomes name-2...
        ask(&mut s, 1, "web", T0).unwrap();
        // ...but one the user chose is never changed: the approval is refused, as the join is.
        let k = key(2);
        s.request_join(
            &request("prod", &k, NameRequest::Exact("web"), "192.0.2.1"),
            T0,
        )
        .unwrap();
        let e = invalid(s.approve("prod", Who::All, ADMIN, T0));
        assert!(
            e.starts_with(&format!(
                "cannot approve web (fingerprint {}",
                k.fingerprint()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "the name \"web\" is taken by node {}",
                web.address
            )),
            "{e}"
        );
        assert!(e.contains("`mesh-controller node remove prod web`"), "{e}");
        assert!(e.ends_with("nothing was approved"), "{e}");
        assert_eq!(s.nodes("prod", T0).unwrap().len(), 1, "all or nothing");
        let approved = s
            .approve("prod", Who::These(&[key(1).fingerprint()]), ADMIN, T0)
            .unwrap();
        assert_eq!(approved[0].name, "web-2");
    }

    #[test]
    fn a_rejected_key_is_refused_until_the_cooldown_ends() {
        let (_d, mut s) = store();
        ask(&mut s, 1, "web", T0).unwrap();
        ask(&mut s, 2, "db", T0).unwrap();
        let rejected = s
            .reject_requests("prod", Who::These(&names(&["web"])), "bob", T0 + 10)
            .unwrap();
        assert_eq!(
            rejected,
            [Rejected {
                name: "web".into(),
                key: key(1)
            }]
        );
        assert_eq!(pending_names(&s, T0 + 10), ["db"]);
        assert_eq!(
            s.request_state(1, &key(1), T0 + 10).unwrap(),
            RequestState::Rejected {
                at: T0 + 10,
                by: "bob".into()
            }
        );
        let (code, message) = refusal(ask(&mut s, 1, "web", T0 + 20));
        assert_eq!(code, ErrorCode::Rejected);
        assert_eq!(message, rejection_message("prod", T0 + 10));
        assert!(
            message.contains(
                "the administrator rejected this node's request to join network \"prod\" at 2027-01-15T08:00:10Z"
            ),
            "{message}"
        );
        assert!(
            message.contains("ask the administrator")
                && message.contains("can ask again after 2027-01-15T09:00:10Z"),
            "{message}"
        );
        let e = invalid(s.reject("prod", Who::These(&names(&["web"])), "bob", T0 + 20));
        assert!(e.contains("no pending request matches"), "{e}");
        let last = T0 + 10 + REJECT_COOLDOWN_SECS - 1;
        assert_eq!(code_of(ask(&mut s, 1, "web", last)), ErrorCode::Rejected);
        let over = last + 1;
        assert_eq!(
            s.request_state(1, &key(1), over).unwrap(),
            RequestState::Gone
        );
        // Past the cooldown it is a new request.
        assert!(matches!(
            ask(&mut s, 1, "web", over),
            Ok(RequestOutcome::Pending { .. })
        ));
        assert_eq!(
            s.pending("prod", over).unwrap()[1].first_seen,
            rfc3339(over)
        );
    }

    fn code_of<T: std::fmt::Debug>(r: Result<T, StoreError>) -> ErrorCode {
        refusal(r).0
    }

    #[test]
    fn a_network_that_approves_automatically_admits_at_once() {
        let (_d, mut s) = store();
        // A key rejected while the network was manual stays refused for the cooldown.
        ask(&mut s, 2, "bad", T0).unwrap();
        s.reject("prod", Who::All, ADMIN, T0).unwrap();
        s.set_approval("prod", Approval::Auto).unwrap();
        assert_eq!(code_of(ask(&mut s, 2, "bad", T0 + 1)), ErrorCode::Rejected);
        let outcome = ask(&mut s, 1, "web", T0 + 1).unwrap();
        let RequestOutcome::Admitted(admission) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            (admission.name.as_str(), admission.address),
            ("web", Ipv4Addr::new(100, 64, 0, 1))
        );
        let node = &s.nodes("prod", T0 + 1).unwrap()[0];
        assert_eq!(node.approved_by.as_deref(), Some("auto (network policy)"));
        assert_eq!(node.approved_at, Some(rfc3339(T0 + 1)));
        assert_eq!(
            s.request_state(1, &key(1), T0 + 1).unwrap(),
            RequestState::Approved
        );
        // A name the user chose and another node holds is refused, as with a token.
        let k = key(3);
        let taken = s.request_join(
            &request("prod", &k, NameRequest::Exact("web"), "192.0.2.1"),
            T0 + 2,
        );
        assert_eq!(code_of(taken), ErrorCode::NameTaken);
        // Requests waiting from before the switch are approved by the administrator, or
        // their nodes are admitted when they ask again.
        s.set_approval("prod", Approval::Manual).unwrap();
        ask(&mut s, 4, "db", T0 + 3).unwrap();
        s.set_approval("prod", Approval::Auto).unwrap();
        assert!(matches!(
            ask(&mut s, 4, "db", T0 + 4),
            Ok(RequestOutcome::Admitted(_))
        ));
        // The rejected request is all that is left.
        assert_eq!(requests_in_table(&s), 1);
    }

    #[test]
    fn token_joins_record_the_token_once_and_settle_a_waiting_request() {
        let (_d, mut s) = store();
        ask(&mut s, 1, "web", T0).unwrap();
        join(&mut s, 1, "web").unwrap();
        assert!(pending_names(&s, T0).is_empty());
        assert_eq!(requests_in_table(&s), 0);
        assert_eq!(
            s.request_state(1, &key(1), T0).unwrap(),
            RequestState::Approved
        );
        let node = &s.nodes("prod", T0).unwrap()[0];
        assert_eq!(node.approved_by.as_deref(), Some("token tok1"));
        assert_eq!(node.approved_at, Some(rfc3339(T0)));
        // Joining again with another token keeps who admitted it first.
        s.create_token(
            "prod",
            &super::super::NewToken::for_test("tok2", b"s2", true),
            T0,
        )
        .unwrap();
        s.join(
            "tok2",
            b"s2",
            &key(1),
            NameRequest::Preferred("web"),
            Candidates::default(),
            T0 + 100,
        )
        .unwrap();
        let node = &s.nodes("prod", T0 + 100).unwrap()[0];
        assert_eq!(node.approved_by.as_deref(), Some("token tok1"));
        assert_eq!(node.approved_at, Some(rfc3339(T0)));
        // A removed node that comes back with a token is admitted anew.
        s.remove_node("prod", "web", T0 + 200).unwrap();
        s.join(
            "tok2",
            b"s2",
            &key(1),
            NameRequest::Preferred("web"),
            Candidates::default(),
            T0 + 300,
        )
        .unwrap();
        let node = &s.nodes("prod", T0 + 300).unwrap()[0];
        assert_eq!(node.approved_by.as_deref(), Some("token tok2"));
        assert_eq!(node.approved_at, Some(rfc3339(T0 + 300)));
    }

    #[test]
    fn a_removed_node_that_asks_again_is_a_new_request() {
        let (_d, mut s) = store();
        ask(&mut s, 1, "web", T0).unwrap();
        s.approve("prod", Who::All, ADMIN, T0).unwrap();
        // A request row beside the membership (none of the store's paths leaves one) goes
        // with the node.
        s.conn
            .execute(
                "INSERT INTO join_requests (network_id, key, name, first_seen, last_seen, state,
                     decided_at, decided_by)
                 VALUES (1, ?1, 'web', ?2, ?2, 'rejected', ?2, 'x')",
                params![key(1).to_string(), T0 as i64],
            )
            .unwrap();
        s.remove_node("prod", "web", T0 + 10).unwrap();
        assert_eq!(requests_in_table(&s), 0);
        assert_eq!(
            s.request_state(1, &key(1), T0 + 10).unwrap(),
            RequestState::Gone
        );
        assert!(matches!(
            ask(&mut s, 1, "web", T0 + 20),
            Ok(RequestOutcome::Pending { .. })
        ));
        assert_eq!(
            s.pending("prod", T0 + 20).unwrap()[0].first_seen,
            rfc3339(T0 + 20)
        );
        // Approved again, it gets its address back.
        let again = s.approve("prod", Who::All, ADMIN, T0 + 30).unwrap();
        assert_eq!(again[0].address, Ipv4Addr::new(100, 64, 0, 1));
    }

    #[test]
    fn reported_endpoints_are_filtered_before_they_are_stored() {
        let (_d, mut s) = store();
        let reported = [
            "198.51.100.4:51820".parse().unwrap(),
            // Refused: loopback, the overlay range, port 0.
            "127.0.0.1:51820".parse().unwrap(),
            "100.64.0.3:51820".parse().unwrap(),
            "198.51.100.4:0".parse().unwrap(),
        ];
        let k = key(1);
        let req = JoinRequest {
            seen: Candidates {
                reported: &reported,
                observed: None,
            },
            ..request("prod", &k, NameRequest::Preferred("web"), "198.51.100.4")
        };
        s.request_join(&req, T0).unwrap();
        let stored: String = s
            .conn
            .query_row("SELECT endpoints FROM join_requests", params![], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, "[\"198.51.100.4:51820\"]");
    }

    /// Key number `i` of a flood (never equal to `key(n)`).
    fn flood_key(i: u32) -> PublicKey {
        let mut k = [0xAA; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        PublicKey(k)
    }

    /// `count` requests from distinct keys, one second apart, from `source(i)`; the drops
    /// reported.
    fn flood(s: &mut Store, count: u32, source: impl Fn(u32) -> IpAddr) -> usize {
        // Ten thousand commits: no fsync each, for speed (the test PostgreSQL runs without
        // fsync anyway). The rules are the same.
        if let Some(c) = s.conn.as_sqlite() {
            c.pragma_update(None, "synchronous", "OFF").unwrap();
        }
        let mut dropped = 0;
        for i in 0..count {
            let k = flood_key(i);
            let name = format!("n{i}");
            let req = JoinRequest {
                source: Some(source(i)),
                ..request("prod", &k, NameRequest::Preferred(&name), "192.0.2.1")
            };
            match s.request_join(&req, T0 + u64::from(i)).unwrap() {
                RequestOutcome::Pending { dropped: d, .. } => dropped += d,
                other => panic!("{other:?}"),
            }
        }
        dropped
    }

    #[test]
    fn a_flood_from_one_source_keeps_only_its_newest_requests() {
        let (_d, mut s) = store();
        // An honest request from elsewhere, before the flood.
        ask(&mut s, 1, "honest", T0).unwrap();
        let count = 10_000;
        let dropped = flood(&mut s, count, |_| "203.0.113.66".parse().unwrap());
        let now = T0 + u64::from(count);
        let rows = s.pending("prod", now).unwrap();
        assert_eq!(rows.len(), MAX_PENDING_PER_SOURCE + 1);
        assert_eq!(requests_in_table(&s) as usize, MAX_PENDING_PER_SOURCE + 1);
        assert_eq!(dropped, count as usize - MAX_PENDING_PER_SOURCE);
        assert_eq!(rows[0].name, "honest", "other sources keep theirs");
        let newest: Vec<String> = (count - MAX_PENDING_PER_SOURCE as u32..count)
            .map(|i| format!("n{i}"))
            .collect();
        let kept: Vec<String> = rows[1..].iter().map(|r| r.name.clone()).collect();
        assert_eq!(kept, newest);
        // The waiting connections of the dropped ones learn it.
        assert_eq!(
            s.request_state(1, &flood_key(0), now).unwrap(),
            RequestState::Gone
        );
        assert_eq!(
            s.request_state(1, &flood_key(count - 1), now).unwrap(),
            RequestState::Pending
        );
    }

    #[test]
    fn a_flood_from_many_sources_keeps_the_network_bounded() {
        let (_d, mut s) = store();
        let count = 10_000;
        let dropped = flood(&mut s, count, |i| {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                0,
                i as u16 + 1,
            ))
        });
        let now = T0 + u64::from(count);
        assert_eq!(
            s.pending("prod", now).unwrap().len(),
            MAX_PENDING_PER_NETWORK
        );
        assert_eq!(requests_in_table(&s) as usize, MAX_PENDING_PER_NETWORK);
        assert_eq!(dropped, count as usize - MAX_PENDING_PER_NETWORK);
        // A node asking again while it waits keeps its place and drops nothing.
        let k = flood_key(count - 1);
        let name = format!("n{}", count - 1);
        let again = s
            .request_join(
                &request("prod", &k, NameRequest::Preferred(&name), "2001:db8::2710"),
                now,
            )
            .unwrap();
        assert!(
            matches!(again, RequestOutcome::Pending { dropped: 0, .. }),
            "{again:?}"
        );
        assert_eq!(requests_in_table(&s) as usize, MAX_PENDING_PER_NETWORK);
    }

    #[test]
    fn the_request_just_written_is_never_the_one_dropped() {
        let (_d, mut s) = store();
        // A source's oldest request refreshed from another source that is full: the other
        // source's oldest goes, not the refreshed one, though it is older.
        ask(&mut s, 1, "moved", T0).unwrap();
        for i in 0..MAX_PENDING_PER_SOURCE as u32 {
            let k = flood_key(i);
            let name = format!("n{i}");
            s.request_join(
                &request("prod", &k, NameRequest::Preferred(&name), "203.0.113.66"),
                T0 + 1 + u64::from(i),
            )
            .unwrap();
        }
        let k = key(1);
        let moved = s
            .request_join(
                &request("prod", &k, NameRequest::Preferred("moved"), "203.0.113.66"),
                T0 + 100,
            )
            .unwrap();
        assert!(
            matches!(moved, RequestOutcome::Pending { dropped: 1, .. }),
            "{moved:?}"
        );
        let names = pending_names(&s, T0 + 100);
        assert_eq!(names.len(), MAX_PENDING_PER_SOURCE);
        assert_eq!(names[0], "moved");
        assert!(!names.contains(&"n0".to_string()), "{names:?}");
    }

    #[test]
    fn names_and_hostnames_are_checked_before_anything_is_stored() {
        let (_d, mut s) = store();
        let k = key(1);
        let bad_name = request(
            "prod",
            &k,
            NameRequest::Preferred("web\x1b[2J"),
            "192.0.2.1",
        );
        assert_eq!(
            code_of(s.request_join(&bad_name, T0)),
            ErrorCode::BadRequest
        );
        let bad_host = JoinRequest {
            hostname: "host\nname",
            ..request("prod", &k, NameRequest::Preferred("web"), "192.0.2.1")
        };
        assert_eq!(
            code_of(s.request_join(&bad_host, T0)),
            ErrorCode::BadRequest
        );
        assert_eq!(requests_in_table(&s), 0);
        let no_host = JoinRequest {
            hostname: "",
            ..request("prod", &k, NameRequest::Preferred("web"), "192.0.2.1")
        };
        assert!(
            s.request_join(&no_host, T0).is_ok(),
            "the hostname is optional"
        );
    }

    #[test]
    fn a_key_that_never_asked_is_gone() {
        let (_d, s) = store();
        assert_eq!(s.request_state(1, &key(7), T0).unwrap(), RequestState::Gone);
    }
}
