//! Control messages between an agent and the controller.
//!
//! They travel inside the Noise channel (see `mesh-control`) as JSON envelopes
//! `{"v": PROTOCOL_VERSION, "msg": {...}}`. Each envelope is at most [`MAX_MESSAGE_LEN`] bytes;
//! [`decode_client`] and [`decode_server`] check the version and every bound before anything
//! else sees the value.

use crate::{PublicKey, PROTOCOL_VERSION};
pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest control message accepted, in bytes (a peer list of ~4000 nodes).
pub const MAX_MESSAGE_LEN: usize = 1 << 20;
/// Longest node or network name.
pub const MAX_NAME_LEN: usize = 63;
/// Most endpoints a node may report.
pub const MAX_ENDPOINTS: usize = 16;
/// Most peers in one peer list or delta.
pub const MAX_PEERS: usize = 4096;
/// Longest human-readable error text.
pub const MAX_ERROR_TEXT: usize = 512;
/// Most standalone relays a controller announces.
pub const MAX_RELAYS: usize = 16;
/// Longest relay address (`host:port`).
pub const MAX_RELAY_ADDR: usize = 255;
/// Most controller addresses a Welcome announces.
pub const MAX_CONTROLLERS: usize = 8;
/// Most revocations announced per relay (the newest removals first).
pub const MAX_REVOCATIONS: usize = 64;
/// Most prefixes one node may advertise (subnet routes).
pub const MAX_ROUTES: usize = 64;
/// Shortest IPv6 overlay prefix a network may have (a ULA site prefix).
pub const MIN_PREFIX6_LEN: u8 = 48;
/// Longest IPv6 overlay prefix a network may have: 16 bits for the nodes' interface ids.
pub const MAX_PREFIX6_LEN: u8 = 112;

/// How a node's NAT maps its UDP socket, as the node found out from two observations of it
/// (the controller's QUIC side and its STUN observer, two destinations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatKind {
    /// No NAT: the controller sees the node at one of its own addresses.
    Public,
    /// One mapping for every destination (peers can reach the mapping the controller sees).
    EndpointIndependent,
    /// A mapping per destination ("symmetric"): only birthday punching or a port mapping on
    /// the router gets a peer through.
    EndpointDependent,
}

impl NatKind {
    /// What two observations of one socket, from two destinations, say (`own`: the node's own
    /// addresses with its port).
    pub fn from_observations(own: &[SocketAddr], first: SocketAddr, second: SocketAddr) -> NatKind {
        if own.contains(&first) && first == second {
            NatKind::Public
        } else if first == second {
            NatKind::EndpointIndependent
        } else {
            NatKind::EndpointDependent
        }
    }
}

impl std::fmt::Display for NatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatKind::Public => "none (public address)",
            NatKind::EndpointIndependent => "endpoint-independent",
            NatKind::EndpointDependent => "endpoint-dependent",
        })
    }
}

/// Messages a node sends to the controller. Its `Debug` form never shows the token secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message of a node that holds a join token. The node's key is the Noise static key.
    Join {
        /// Token identifier (the part of the token stored in clear by the controller).
        token_id: String,
        /// Token secret, hex; the controller stores only its SHA-256.
        token_secret: String,
        /// Requested node name (hostname by default).
        name: String,
        /// Addresses this node can be reached at (local addresses with its UDP port).
        endpoints: Vec<SocketAddr>,
        /// The user chose `name` (`mesh join --name`): refuse with [`ErrorCode::NameTaken`]
        /// when another node holds it, instead of registering the node under `name-2`.
        /// Absent (false) from older agents.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        exact_name: bool,
    },
    /// First message of a node that asks to join by network id (`mesh join meshnet1_...`):
    /// no secret, so the controller admits it only once the administrator approves (or at
    /// once where the network approves automatically). The answer is a `Welcome`, or
    /// `Pending` and later a `Welcome` on the same connection, or an `Error`.
    RequestJoin {
        /// The network asked for.
        network: String,
        /// Requested node name (hostname by default).
        name: String,
        /// The machine's hostname, shown to the administrator beside the name.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        hostname: String,
        /// Addresses this node can be reached at (local addresses with its UDP port).
        endpoints: Vec<SocketAddr>,
        /// As in `Join`: the user chose `name`, so a name taken at approval is refused.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        exact_name: bool,
    },
    /// First message of a node that already joined: its key (from Noise) identifies it.
    Hello {
        /// The network the node believes it is in.
        network: String,
        /// Addresses this node can be reached at.
        endpoints: Vec<SocketAddr>,
        /// The standalone relay the node keeps as its home (nearest), if any; `None` means the
        /// controller's embedded relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        home_relay: Option<String>,
        /// The node's NAT kind, once it knows it (from an earlier connection).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nat: Option<NatKind>,
        /// The prefixes the node routes and offers to its peers (subnet routes: its pod
        /// subnet, say), all of them: the controller approves them (see [`RouteState`]).
        /// Absent: none.
        #[serde(flatten, with = "routes_wire")]
        routes: Vec<IpNet>,
        /// The prefixes the node offers as an exit (reached through its own uplink rather
        /// than inside its site; `0.0.0.0/0` for everything), all of them: approved like
        /// routes, but a peer uses one only when it opts in (`mesh up --exit-node`). Absent:
        /// none.
        #[serde(flatten, with = "exits_wire")]
        exits: Vec<IpNet>,
    },
    /// Periodic liveness and endpoint refresh.
    Heartbeat {
        /// Addresses this node can be reached at.
        endpoints: Vec<SocketAddr>,
        /// The node's home relay, as in `Hello`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        home_relay: Option<String>,
        /// The node's NAT kind, as in `Hello`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nat: Option<NatKind>,
        /// The prefixes the node routes, as in `Hello` (the whole list each time).
        #[serde(flatten, with = "routes_wire")]
        routes: Vec<IpNet>,
        /// The prefixes the node offers as an exit, as in `Hello` (the whole list each time).
        #[serde(flatten, with = "exits_wire")]
        exits: Vec<IpNet>,
    },
    /// The node leaves the network for good; the controller deletes it.
    Leave,
}

impl std::fmt::Debug for ClientMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientMsg::Join {
                token_id,
                name,
                endpoints,
                exact_name,
                ..
            } => f
                .debug_struct("Join")
                .field("token_id", token_id)
                .field("token_secret", &"<hidden>")
                .field("name", name)
                .field("endpoints", endpoints)
                .field("exact_name", exact_name)
                .finish(),
            ClientMsg::RequestJoin {
                network,
                name,
                hostname,
                endpoints,
                exact_name,
            } => f
                .debug_struct("RequestJoin")
                .field("network", network)
                .field("name", name)
                .field("hostname", hostname)
                .field("endpoints", endpoints)
                .field("exact_name", exact_name)
                .finish(),
            ClientMsg::Hello {
                network,
                endpoints,
                home_relay,
                nat,
                routes,
                exits,
            } => f
                .debug_struct("Hello")
                .field("network", network)
                .field("endpoints", endpoints)
                .field("home_relay", home_relay)
                .field("nat", nat)
                .field("routes", routes)
                .field("exits", exits)
                .finish(),
            ClientMsg::Heartbeat {
                endpoints,
                home_relay,
                nat,
                routes,
                exits,
            } => f
                .debug_struct("Heartbeat")
                .field("endpoints", endpoints)
                .field("home_relay", home_relay)
                .field("nat", nat)
                .field("routes", routes)
                .field("exits", exits)
                .finish(),
            ClientMsg::Leave => f.write_str("Leave"),
        }
    }
}

/// The largest birthday budget (attempts per node per 10 minutes) a network may set.
pub const MAX_BIRTHDAY_BUDGET: u16 = 64;

/// Messages the controller sends to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to `Join` or `Hello`: who the node is and the whole peer list.
    Welcome(Welcome),
    /// The relay list changed, or its tickets were renewed: the whole list again.
    Relays {
        /// Standalone relays the node may use.
        relays: Vec<RelayInfo>,
    },
    /// Changes to the peer list since the last message.
    PeersChanged {
        /// Peers that are new or whose details changed.
        upsert: Vec<PeerInfo>,
        /// Keys of peers that left or were removed.
        remove: Vec<PublicKey>,
    },
    /// The network's settings changed (sent only on a change; the Welcome carries them too).
    Settings {
        /// See [`Welcome::birthday_budget`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        birthday_budget: Option<u16>,
    },
    /// Where the prefixes this node advertises stand (sent after the welcome when the node
    /// advertises any, and whenever one changes): the whole list.
    Routes {
        /// One entry per advertised prefix.
        routes: Vec<RouteState>,
    },
    /// Answer to `RequestJoin` where the administrator must approve: the request is recorded
    /// and the connection stays open; a `Welcome` follows on it once approved, or an `Error`
    /// (`rejected`, or `request_dropped`: ask again). Nothing about the network comes before.
    Pending {
        /// The network asked for.
        network: String,
        /// The name the request is recorded under (the admin approves it by this name).
        name: String,
    },
    /// The network's names for several nodes (`mesh-controller name set`): the whole list,
    /// sent after the welcome when the network has any, and whenever one changes.
    Names {
        /// One entry per name.
        names: Vec<NameAlias>,
    },
    /// Answer to `Leave`: the node is deleted.
    Left,
    /// The request was refused; the connection closes after this.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// What was wrong and what to do, for a person.
        message: String,
    },
}

/// A name that resolves to several nodes, such as kubeadm's `controlPlaneEndpoint`: each node
/// answers it with the overlay addresses of the members it can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameAlias {
    /// The name, a DNS name by the rules of [`valid_node_name`].
    pub name: String,
    /// The member nodes, by node name.
    pub nodes: Vec<String>,
    /// The members the controller sees offline (no control connection, or removed): a node
    /// answers the name with the other members' addresses, and with all of them only when
    /// every member is offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

/// Most names for several nodes a network may have.
pub const MAX_ALIASES: usize = 64;
/// Most nodes one such name may stand for.
pub const MAX_ALIAS_NODES: usize = 16;

/// The controller's answer to `Join` or `Hello`. On the wire its fields sit beside
/// `"type": "welcome"`, like every other message's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Network name.
    pub network: String,
    /// The node's name as registered.
    pub name: String,
    /// The node's overlay address; stable for its key.
    pub address: Ipv4Addr,
    /// Prefix length of the network's CIDR.
    pub prefix_len: u8,
    /// The node's IPv6 overlay address, inside `prefix6`; stable for its key. `None` from
    /// older controllers and in networks without an IPv6 overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// The network's IPv6 overlay prefix (a ULA, `fdXX:XXXX:XXXX::/64` by default): the
    /// node routes it to `mesh0`. Present whenever `address6` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6: Option<Ipv6Net>,
    /// Every other node of the network.
    pub peers: Vec<PeerInfo>,
    /// Standalone relays the node may use, each with its admission ticket.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The node's address as the controller sees it: its public mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<SocketAddr>,
    /// Where the controller's STUN observer answers binding requests: a second destination
    /// whose view of the node's mapping, beside `observed`, tells the node its [`NatKind`]. An
    /// unspecified IP means the address the node reached the controller at. `None` from older
    /// controllers or with the observer off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observer: Option<SocketAddr>,
    /// Birthday attempts per node per 10 minutes that the network allows, started or joined
    /// (0: none); `None`: the node's default. The administrator's setting for the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday_budget: Option<u16>,
    /// The QUIC addresses (`host:port`) the controller says it can be reached at, in the order
    /// nodes should try them after the one they used: the node saves them and tries them when
    /// that one stops answering, so a controller that moves announces its new address first
    /// (`mesh-controller serve --announce`). Empty from controllers that announce none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// The controller's wall clock when it sent the welcome, in milliseconds since the Unix
    /// epoch: the node compares it with its own clock (`mesh doctor`'s clock check), since
    /// tokens and relay tickets carry expiry times. `None` from older controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<u64>,
    /// Peers that follow this welcome, in `PeersChanged` messages (upserts only) sent right
    /// after it and before anything else: a large network's list does not fit one message
    /// ([`MAX_PEERS`], [`MAX_MESSAGE_LEN`]). The node takes the list as complete once it has
    /// them all ([`Welcome::take_rest`]). 0 (absent) from older controllers and for lists
    /// that fit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub more_peers: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most peers a welcome may announce beyond its own ([`Welcome::more_peers`]).
pub const MAX_MORE_PEERS: u32 = 1 << 20;

impl Welcome {
    /// Takes one message that follows a welcome with [`Welcome::more_peers`] into its peer
    /// list. `Ok(true)` once the list is complete; an error for anything else than the
    /// `PeersChanged` the controller promised.
    pub fn take_rest(&mut self, msg: ServerMsg) -> Result<bool, String> {
        let ServerMsg::PeersChanged { upsert, remove } = msg else {
            return Err(format!(
                "expected the rest of the peer list ({} more peers), got another message",
                self.more_peers
            ));
        };
        if !remove.is_empty() || upsert.len() as u64 > u64::from(self.more_peers) {
            return Err(format!(
                "the rest of the peer list does not match the welcome ({} more peers announced, {} sent, {} removed)",
                self.more_peers,
                upsert.len(),
                remove.len()
            ));
        }
        self.more_peers -= upsert.len() as u32;
        self.peers.extend(upsert);
        Ok(self.more_peers == 0)
    }
}

/// Where one advertised prefix stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// The prefix (IPv4 or IPv6: only ever one the node advertised itself).
    pub prefix: IpNet,
    /// Its state.
    pub state: RouteStatus,
    /// Why, for `refused` (and who decided, for `rejected`), for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether it is offered as an exit (`exits` in `Hello`) rather than a route.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit: bool,
}

/// The state of an advertised prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteStatus {
    /// Approved: peers route it to this node.
    Approved,
    /// Waiting for the administrator (`mesh-controller route approve`).
    Pending,
    /// Rejected by the administrator.
    Rejected,
    /// Refused by the controller's rules: it overlaps another node's prefix or the overlay.
    Refused,
}

/// One peer as the controller describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's WireGuard / node key.
    pub key: PublicKey,
    /// The peer's name.
    pub name: String,
    /// The peer's overlay address.
    pub address: Ipv4Addr,
    /// The peer's IPv6 overlay address, if the network has an IPv6 overlay; absent from older
    /// controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// Where the peer may be reached: its observed address first, then the reported addresses
    /// this viewer may probe (see PROTOCOL.md, "Candidates").
    pub endpoints: Vec<SocketAddr>,
    /// The peer's home relay (a standalone relay's name); `None`: the controller's relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// The address the controller saw the peer's control connection come from (its public
    /// mapping); `None` from older controllers or for a peer never seen connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<SocketAddr>,
    /// The peer's NAT kind as it reported it; `None` while unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatKind>,
    /// The prefixes the peer routes, as the controller approved them (subnet routes): packets
    /// to them go to the peer, and it may send from them. Absent from older controllers.
    #[serde(flatten, with = "routes_wire")]
    pub routes: Vec<IpNet>,
    /// The prefixes the peer offers as an exit, as approved: used only by a node that opts
    /// in to this peer as its exit for them. Absent from older controllers.
    #[serde(flatten, with = "exits_wire")]
    pub exits: Vec<IpNet>,
}

/// A standalone relay (one region) as the controller announces it to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Region name, unique per controller.
    pub name: String,
    /// Where the relay listens, `host:port`.
    pub addr: String,
    /// Where it listens on TCP (TLS after an HTTP upgrade), for nodes whose UDP is blocked;
    /// absent from older controllers and for relays registered without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// The relay's static key, which the node pins in the Noise handshake.
    pub key: PublicKey,
    /// Admits this node at this relay.
    pub ticket: Ticket,
    /// Nodes recently removed from the node's network, for this relay: the node forwards them
    /// to the relay, which closes their connections and refuses their old tickets. At most
    /// [`MAX_REVOCATIONS`]; absent from older controllers (and ignored by older nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<Revocation>,
}

/// The controller's word, for one relay, that tickets of `key` in the ticket's network that
/// expire at or before `expires` are void: the node was removed. A ticket issued after the
/// removal (the node joined again) expires later and stays valid. The relay may forget a
/// revocation once `expires` has passed, since every ticket it voids has expired by then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The removed node's key.
    pub key: PublicKey,
    /// Unix seconds: the latest expiry of a ticket the controller issued before the removal.
    pub expires: u64,
    /// HMAC-SHA256 over network, node key and expiry (another label than tickets), hex; keyed
    /// like tickets.
    pub mac: String,
}

/// Proof, made by the controller for one relay, that a node belongs to a network until
/// `expires`. The node key is not in it: the relay takes it from the Noise handshake, so a ticket
/// is useless without the node's private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The network the node belongs to.
    pub network: String,
    /// Unix seconds after which the relay refuses the ticket.
    pub expires: u64,
    /// HMAC-SHA256 over network, node key and expiry, hex; keyed by the controller-relay
    /// Diffie-Hellman secret.
    pub mac: String,
}

/// Why the controller refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Unknown token id or wrong secret.
    TokenInvalid,
    /// Token past its expiry.
    TokenExpired,
    /// Token revoked by the admin.
    TokenRevoked,
    /// One-shot token already used by another node.
    TokenUsed,
    /// The node's key is not (or no longer) in the network.
    NodeUnknown,
    /// The network's address range is full.
    NetworkFull,
    /// The name is taken by another live node.
    NameTaken,
    /// The message was malformed or out of bounds.
    BadRequest,
    /// The protocol version is not supported.
    VersionMismatch,
    /// Something failed on the controller.
    Internal,
    /// A relay ticket that does not verify (made for another relay, node or controller).
    TicketInvalid,
    /// A relay ticket past its expiry.
    TicketExpired,
    /// The administrator rejected this node's join request.
    Rejected,
    /// The network asked for does not exist (any more) on this controller.
    NetworkUnknown,
    /// The pending join request lapsed (24 h), or was pushed out by newer ones, or the
    /// controller has too many from this address: ask again later.
    RequestDropped,
}

/// A control message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_LEN}")]
    TooLong(usize),
    /// Not a valid envelope.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Envelope carries another protocol version.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// A field is outside its bound.
    #[error("field out of bounds: {0}")]
    Bounds(&'static str),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u16,
    msg: T,
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain types to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        msg,
    })
    .unwrap_or_default()
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u16,
    }
    let head: VersionOnly =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if head.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(head.v));
    }
    let env: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(env.msg)
}

/// Longest hostname a join request carries.
pub const MAX_HOSTNAME_LEN: usize = 253;

/// Checks a hostname as a join request carries it: 1..=253 characters of `[A-Za-z0-9._-]`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks a node or network name: 1..=63 characters of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks a name as Kubernetes checks node names (an RFC 1123 subdomain: lowercase letters,
/// digits, '-' and '.', each dot-separated label 1..=63 characters that start and end with a
/// letter or digit), within mesh's limit of [`MAX_NAME_LEN`] characters. `node-b` and
/// `master.example.com` pass; `Node_B` and `-a` do not.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A valid node name close to `name` (a hostname, say): lowercase, other characters as '-'.
pub fn node_name_like(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.') => c,
            _ => '-',
        })
        .collect();
    out = out
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    out.truncate(MAX_NAME_LEN);
    let out = out.trim_end_matches(['-', '.']).to_owned();
    if out.is_empty() {
        "node-1".to_owned()
    } else {
        out
    }
}

fn check_aliases(names: &[NameAlias]) -> Result<(), DecodeError> {
    if names.len() > MAX_ALIASES
        || names.iter().any(|a| {
            !valid_node_name(&a.name)
                || a.nodes.len() > MAX_ALIAS_NODES
                || a.down.len() > MAX_ALIAS_NODES
                || a.nodes.iter().chain(&a.down).any(|n| !valid_name(n))
        })
    {
        return Err(DecodeError::Bounds("names"));
    }
    Ok(())
}

fn check_endpoints(e: &[SocketAddr]) -> Result<(), DecodeError> {
    if e.len() > MAX_ENDPOINTS {
        return Err(DecodeError::Bounds("endpoints"));
    }
    Ok(())
}

/// Checks a ticket's bounds.
pub(crate) fn check_ticket(t: &Ticket) -> Result<(), DecodeError> {
    if !valid_name(&t.network) || t.mac.len() != 64 {
        return Err(DecodeError::Bounds("ticket"));
    }
    Ok(())
}

/// Checks a list of revocations' bounds.
pub(crate) fn check_revocations(r: &[Revocation]) -> Result<(), DecodeError> {
    if r.len() > MAX_REVOCATIONS || r.iter().any(|r| r.mac.len() != 64) {
        return Err(DecodeError::Bounds("revoked"));
    }
    Ok(())
}

fn check_relays(r: &[RelayInfo]) -> Result<(), DecodeError> {
    if r.len() > MAX_RELAYS {
        return Err(DecodeError::Bounds("relays"));
    }
    for relay in r {
        if !valid_name(&relay.name) || relay.addr.is_empty() || relay.addr.len() > MAX_RELAY_ADDR {
            return Err(DecodeError::Bounds("relay"));
        }
        check_ticket(&relay.ticket)?;
        check_revocations(&relay.revoked)?;
    }
    Ok(())
}

fn check_home(home: &Option<String>) -> Result<(), DecodeError> {
    match home {
        Some(h) if !valid_name(h) => Err(DecodeError::Bounds("home_relay")),
        _ => Ok(()),
    }
}

/// The wire form of a list of prefixes of both families: IPv4 ones under the field's own name
/// (`routes`, `exits`), IPv6 ones under the same name with a `6` (`routes6`, `exits6`), each
/// absent when empty. Kept apart so that an older peer, which knows only the IPv4 field and
/// ignores unknown ones, still reads the IPv4 prefixes of a list that has IPv6 ones too.
macro_rules! prefixes_wire {
    ($module:ident, $v4:literal, $v6:literal) => {
        mod $module {
            use super::{IpNet, Ipv4Net, Ipv6Net};
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            #[derive(Serialize)]
            struct Out {
                #[serde(rename = $v4, skip_serializing_if = "Vec::is_empty")]
                v4: Vec<Ipv4Net>,
                #[serde(rename = $v6, skip_serializing_if = "Vec::is_empty")]
                v6: Vec<Ipv6Net>,
            }

            #[derive(Deserialize)]
            struct In {
                #[serde(rename = $v4, default)]
                v4: Vec<Ipv4Net>,
                #[serde(rename = $v6, default)]
                v6: Vec<Ipv6Net>,
            }

            pub fn serialize<S: Serializer>(all: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
                let mut out = Out {
                    v4: Vec::new(),
                    v6: Vec::new(),
                };
                for prefix in all {
                    match prefix {
                        IpNet::V4(p) => out.v4.push(*p),
                        IpNet::V6(p) => out.v6.push(*p),
                    }
                }
                out.serialize(s)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
                let wire = In::deserialize(d)?;
                Ok(wire
                    .v4
                    .into_iter()
                    .map(IpNet::V4)
                    .chain(wire.v6.into_iter().map(IpNet::V6))
                    .collect())
            }
        }
    };
}

prefixes_wire!(routes_wire, "routes", "routes6");
prefixes_wire!(exits_wire, "exits", "exits6");

fn check_routes(r: &[IpNet]) -> Result<(), DecodeError> {
    if r.len() > MAX_ROUTES {
        return Err(DecodeError::Bounds("routes"));
    }
    Ok(())
}

fn check_route_states(r: &[RouteState]) -> Result<(), DecodeError> {
    if r.len() > MAX_ROUTES
        || r.iter()
            .any(|s| s.reason.as_ref().is_some_and(|t| t.len() > MAX_ERROR_TEXT))
    {
        return Err(DecodeError::Bounds("routes"));
    }
    Ok(())
}

/// Whether `prefix` may be a network's IPv6 overlay: a ULA (`fc00::/7`) of
/// [`MIN_PREFIX6_LEN`]..=[`MAX_PREFIX6_LEN`] bits, without host bits.
pub fn valid_prefix6(prefix: &Ipv6Net) -> bool {
    let ula = Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7);
    (MIN_PREFIX6_LEN..=MAX_PREFIX6_LEN).contains(&prefix.prefix_len())
        && prefix.trunc() == *prefix
        && ula.contains(prefix)
}

/// Whether `address` may be a node's IPv6 overlay address (unicast, not the unspecified or
/// loopback address).
pub fn valid_address6(address: Ipv6Addr) -> bool {
    !(address.is_unspecified() || address.is_loopback() || address.is_multicast())
}

/// A welcome's IPv6 overlay: none, or an address inside a valid prefix (a prefix without an
/// address is allowed: the node's address is not known yet).
fn check_overlay6(address: Option<Ipv6Addr>, prefix: Option<Ipv6Net>) -> Result<(), DecodeError> {
    if prefix.is_some_and(|p| !valid_prefix6(&p)) {
        return Err(DecodeError::Bounds("prefix6"));
    }
    match (address, prefix) {
        (Some(a), Some(p)) if valid_address6(a) && p.contains(&a) && a != p.network() => Ok(()),
        (Some(_), _) => Err(DecodeError::Bounds("address6")),
        (None, _) => Ok(()),
    }
}

fn check_peers(p: &[PeerInfo]) -> Result<(), DecodeError> {
    if p.len() > MAX_PEERS {
        return Err(DecodeError::Bounds("peers"));
    }
    for peer in p {
        if peer.address6.is_some_and(|a| !valid_address6(a)) {
            return Err(DecodeError::Bounds("peer address6"));
        }
        check_routes(&peer.routes)?;
        check_routes(&peer.exits)?;
        if !valid_name(&peer.name) {
            return Err(DecodeError::Bounds("peer name"));
        }
        check_endpoints(&peer.endpoints)?;
        check_home(&peer.relay)?;
    }
    Ok(())
}

impl ClientMsg {
    /// Encodes this message as an envelope.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

impl ServerMsg {
    /// Encodes this message as an envelope.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

/// Decodes and bounds-checks a message sent by a node.
pub fn decode_client(bytes: &[u8]) -> Result<ClientMsg, DecodeError> {
    let msg: ClientMsg = decode(bytes)?;
    match &msg {
        ClientMsg::Join {
            token_id,
            token_secret,
            name,
            endpoints,
            exact_name: _,
        } => {
            if token_id.len() > 64 || token_secret.len() > 128 {
                return Err(DecodeError::Bounds("token"));
            }
            if !valid_name(name) {
                return Err(DecodeError::Bounds("name"));
            }
            check_endpoints(endpoints)?;
        }
        ClientMsg::RequestJoin {
            network,
            name,
            hostname,
            endpoints,
            ..
        } => {
            if !valid_name(network) || !valid_name(name) {
                return Err(DecodeError::Bounds("name"));
            }
            if !hostname.is_empty() && !valid_hostname(hostname) {
                return Err(DecodeError::Bounds("hostname"));
            }
            check_endpoints(endpoints)?;
        }
        ClientMsg::Hello {
            network,
            endpoints,
            home_relay,
            routes,
            exits,
            ..
        } => {
            if !valid_name(network) {
                return Err(DecodeError::Bounds("network"));
            }
            check_endpoints(endpoints)?;
            check_home(home_relay)?;
            check_routes(routes)?;
            check_routes(exits)?;
        }
        ClientMsg::Heartbeat {
            endpoints,
            home_relay,
            routes,
            exits,
            ..
        } => {
            check_endpoints(endpoints)?;
            check_home(home_relay)?;
            check_routes(routes)?;
            check_routes(exits)?;
        }
        ClientMsg::Leave => {}
    }
    Ok(msg)
}

/// Decodes and bounds-checks a message sent by the controller.
pub fn decode_server(bytes: &[u8]) -> Result<ServerMsg, DecodeError> {
    let msg: ServerMsg = decode(bytes)?;
    match &msg {
        ServerMsg::Welcome(Welcome {
            network,
            name,
            prefix_len,
            address6,
            prefix6,
            peers,
            relays,
            controllers,
            more_peers,
            ..
        }) => {
            if *more_peers > MAX_MORE_PEERS {
                return Err(DecodeError::Bounds("more_peers"));
            }
            if !valid_name(network) || !valid_name(name) {
                return Err(DecodeError::Bounds("name"));
            }
            if !(8..=30).contains(prefix_len) {
                return Err(DecodeError::Bounds("prefix_len"));
            }
            check_overlay6(*address6, *prefix6)?;
            check_peers(peers)?;
            check_relays(relays)?;
            if controllers.len() > MAX_CONTROLLERS
                || controllers
                    .iter()
                    .any(|c| c.is_empty() || c.len() > MAX_RELAY_ADDR)
            {
                return Err(DecodeError::Bounds("controllers"));
            }
        }
        ServerMsg::Relays { relays } => check_relays(relays)?,
        ServerMsg::PeersChanged { upsert, remove } => {
            check_peers(upsert)?;
            if remove.len() > MAX_PEERS {
                return Err(DecodeError::Bounds("remove"));
            }
        }
        ServerMsg::Error { message, .. } => {
            if message.len() > MAX_ERROR_TEXT {
                return Err(DecodeError::Bounds("error message"));
            }
        }
        ServerMsg::Routes { routes } => check_route_states(routes)?,
        ServerMsg::Pending { network, name } => {
            if !valid_name(network) || !valid_name(name) {
                return Err(DecodeError::Bounds("name"));
            }
        }
        ServerMsg::Names { names } => check_aliases(names)?,
        ServerMsg::Settings { .. } | ServerMsg::Left => {}
    }
    Ok(msg)
}

#[cfg(test)]
mod debug_tests {
    use super::ClientMsg;

    #[test]
    fn a_join_logged_at_debug_level_shows_no_secret() {
        let join = ClientMsg::Join {
            token_id: "2438f77a".into(),
            token_secret: "c0ffee00c0ffee00".into(),
            name: "n1".into(),
            endpoints: vec![],
            exact_name: false,
        };
        let text = format!("{join:?}");
        assert!(
            text.contains("2438f77a") && !text.contains("c0ffee00"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_kind_from_two_observations() {
        let own: Vec<SocketAddr> = vec!["192.0.2.5:51820".parse().unwrap()];
        let a: SocketAddr = "192.0.2.5:51820".parse().unwrap();
        let b: SocketAddr = "203.0.113.4:40000".parse().unwrap();
        let c: SocketAddr = "203.0.113.4:40001".parse().unwrap();
        assert_eq!(NatKind::from_observations(&own, a, a), NatKind::Public);
        assert_eq!(
            NatKind::from_observations(&own, b, b),
            NatKind::EndpointIndependent
        );
        assert_eq!(
            NatKind::from_observations(&own, b, c),
            NatKind::EndpointDependent
        );
        // Its own address to one, another port to the other: a NAT that keeps ports while it can.
        assert_eq!(
            NatKind::from_observations(&own, a, c),
            NatKind::EndpointDependent
        );
        let json = serde_json::to_string(&NatKind::EndpointDependent).unwrap();
        assert_eq!(json, "\"endpoint_dependent\"");
    }

    fn peer(n: u8) -> PeerInfo {
        PeerInfo {
            key: PublicKey([n; 32]),
            name: format!("node-{n}"),
            address: Ipv4Addr::new(100, 64, 0, n),
            address6: Some(Ipv6Addr::new(
                0xfd5e,
                0x1234,
                0x5678,
                0,
                0,
                0,
                0,
                u16::from(n),
            )),
            endpoints: vec![SocketAddr::from(([192, 0, 2, n], 51820))],
            relay: n.is_multiple_of(2).then(|| "eu-1".to_owned()),
            observed: n
                .is_multiple_of(3)
                .then(|| SocketAddr::from(([192, 0, 2, n], 51820))),
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        }
    }

    fn relay(name: &str) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            addr: "relay.example.net:7000".into(),
            tcp: Some("relay.example.net:443".into()),
            key: PublicKey([9; 32]),
            ticket: Ticket {
                network: "prod".into(),
                expires: 1_900_000_000,
                mac: "ab".repeat(32),
            },
            revoked: if name == "eu-1" {
                vec![Revocation {
                    key: PublicKey([4; 32]),
                    expires: 1_900_000_000,
                    mac: "cd".repeat(32),
                }]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn round_trip_every_message() {
        let client = [
            ClientMsg::Join {
                token_id: "ab12".into(),
                token_secret: "ff".into(),
                name: "node-1".into(),
                endpoints: vec![SocketAddr::from(([192, 0, 2, 1], 51820))],
                exact_name: false,
            },
            ClientMsg::Join {
                token_id: "ab12".into(),
                token_secret: "ff".into(),
                name: "web".into(),
                endpoints: vec![],
                exact_name: true,
            },
            ClientMsg::Hello {
                network: "prod".into(),
                endpoints: vec![],
                home_relay: None,
                nat: None,
                routes: Vec::new(),
                exits: Vec::new(),
            },
            ClientMsg::Heartbeat {
                endpoints: vec![],
                home_relay: Some("eu-1".into()),
                nat: None,
                routes: Vec::new(),
                exits: Vec::new(),
            },
            ClientMsg::Leave,
        ];
        for m in client {
            assert_eq!(decode_client(&m.encode()), Ok(m));
        }
        let server = [
            ServerMsg::Welcome(Welcome {
                network: "prod".into(),
                name: "node-1".into(),
                address: Ipv4Addr::new(100, 64, 0, 1),
                prefix_len: 16,
                address6: Some("fd5e:1234:5678::1".parse().unwrap()),
                prefix6: Some("fd5e:1234:5678::/64".parse().unwrap()),
                peers: vec![peer(2), peer(3)],
                relays: vec![relay("eu-1")],
                observed: Some(SocketAddr::from(([203, 0, 113, 9], 40000))),
                observer: None,
                birthday_budget: Some(2),
                controllers: vec!["ctl.example:7443".into()],
                now: Some(1_796_300_000_123),
                more_peers: 0,
            }),
            ServerMsg::Settings {
                birthday_budget: Some(0),
            },
            ServerMsg::Settings {
                birthday_budget: None,
            },
            ServerMsg::Relays {
                relays: vec![relay("eu-1"), relay("us-1")],
            },
            ServerMsg::PeersChanged {
                upsert: vec![peer(4)],
                remove: vec![PublicKey([2; 32])],
            },
            ServerMsg::Left,
            ServerMsg::Error {
                code: ErrorCode::TokenExpired,
                message: "expired".into(),
            },
        ];
        for m in server {
            assert_eq!(decode_server(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn rejects_other_version() {
        let bytes = br#"{"v":99,"msg":{"type":"leave"}}"#;
        assert_eq!(decode_client(bytes), Err(DecodeError::Version(99)));
    }

    #[test]
    fn rejects_oversized_and_out_of_bounds() {
        let big = vec![b' '; MAX_MESSAGE_LEN + 1];
        assert_eq!(
            decode_client(&big),
            Err(DecodeError::TooLong(MAX_MESSAGE_LEN + 1))
        );
        let m = ClientMsg::Heartbeat {
            endpoints: vec![SocketAddr::from(([192, 0, 2, 1], 1)); MAX_ENDPOINTS + 1],
            home_relay: None,
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        };
        assert_eq!(
            decode_client(&m.encode()),
            Err(DecodeError::Bounds("endpoints"))
        );
        let m = ClientMsg::Join {
            token_id: "a".into(),
            token_secret: "b".into(),
            name: "bad name with spaces".into(),
            endpoints: vec![],
            exact_name: false,
        };
        assert_eq!(decode_client(&m.encode()), Err(DecodeError::Bounds("name")));
    }

    /// A welcome of node-1 in network prod, with nothing in its lists.
    fn bare_welcome() -> Welcome {
        Welcome {
            network: "prod".into(),
            name: "node-1".into(),
            address: Ipv4Addr::new(100, 64, 0, 1),
            prefix_len: 16,
            address6: None,
            prefix6: None,
            peers: vec![],
            relays: vec![],
            observed: None,
            observer: None,
            birthday_budget: None,
            controllers: vec![],
            now: None,
            more_peers: 0,
        }
    }

    #[test]
    fn a_welcome_is_completed_by_the_peers_that_follow_it() {
        let mut w = Welcome {
            peers: (2..4).map(peer).collect(),
            more_peers: 3,
            ..bare_welcome()
        };
        let m = ServerMsg::Welcome(w.clone());
        assert_eq!(decode_server(&m.encode()), Ok(m));
        let more = |n: std::ops::Range<u8>| ServerMsg::PeersChanged {
            upsert: n.map(peer).collect(),
            remove: vec![],
        };
        // Anything else than the promised peers is an error, and changes nothing.
        let before = w.clone();
        assert!(w.take_rest(ServerMsg::Left).is_err());
        assert!(w.take_rest(more(4..8)).is_err(), "more than announced");
        let removal = ServerMsg::PeersChanged {
            upsert: vec![],
            remove: vec![peer(2).key],
        };
        assert!(w.take_rest(removal).is_err());
        assert_eq!(w, before);
        assert_eq!(w.take_rest(more(4..6)), Ok(false));
        assert_eq!(w.take_rest(more(6..7)), Ok(true));
        assert_eq!(w.more_peers, 0);
        assert_eq!(w.peers, (2..7).map(peer).collect::<Vec<_>>());
        // Bounded on the wire.
        let huge = ServerMsg::Welcome(Welcome {
            more_peers: MAX_MORE_PEERS + 1,
            ..before
        });
        assert_eq!(
            decode_server(&huge.encode()),
            Err(DecodeError::Bounds("more_peers"))
        );
    }

    #[test]
    fn announced_controllers_are_bounded() {
        let welcome = |controllers: Vec<String>| {
            ServerMsg::Welcome(Welcome {
                controllers,
                ..bare_welcome()
            })
        };
        let ok = welcome(vec!["ctl.example:7443".into(); MAX_CONTROLLERS]);
        assert_eq!(decode_server(&ok.encode()), Ok(ok));
        for bad in [
            vec!["ctl.example:7443".to_owned(); MAX_CONTROLLERS + 1],
            vec![String::new()],
            vec!["x".repeat(MAX_RELAY_ADDR + 1)],
        ] {
            assert_eq!(
                decode_server(&welcome(bad).encode()),
                Err(DecodeError::Bounds("controllers"))
            );
        }
    }

    #[test]
    fn advertised_routes_are_bounded_and_absent_means_none() {
        let hb = |routes: Vec<IpNet>| ClientMsg::Heartbeat {
            endpoints: vec![],
            home_relay: None,
            nat: None,
            routes,
            exits: Vec::new(),
        };
        let pods: IpNet = "10.244.1.0/24".parse().unwrap();
        let ok = hb(vec![pods]);
        let text = String::from_utf8(ok.encode()).unwrap();
        assert!(text.contains("\"10.244.1.0/24\""), "{text}");
        assert_eq!(decode_client(&ok.encode()), Ok(ok));
        assert_eq!(
            decode_client(&hb(vec![pods; MAX_ROUTES + 1]).encode()),
            Err(DecodeError::Bounds("routes"))
        );
        // An older agent's heartbeat: no field, no routes.
        let old = br#"{"v":1,"msg":{"type":"heartbeat","endpoints":[]}}"#;
        assert_eq!(decode_client(old), Ok(hb(vec![])));
        // A prefix that is not one is malformed, not taken.
        let bad =
            br#"{"v":1,"msg":{"type":"heartbeat","endpoints":[],"routes":["10.244.1.0/33"]}}"#;
        assert!(matches!(decode_client(bad), Err(DecodeError::Malformed(_))));
        let states = ServerMsg::Routes {
            routes: vec![RouteState {
                prefix: pods,
                state: RouteStatus::Refused,
                reason: Some("overlaps 10.244.0.0/16 of node b".into()),
                exit: false,
            }],
        };
        assert_eq!(decode_server(&states.encode()), Ok(states));
    }

    #[test]
    fn ipv6_prefixes_travel_beside_ipv4_ones_where_older_readers_skip_them() {
        let pods: IpNet = "10.244.1.0/24".parse().unwrap();
        let pods6: IpNet = "fd00:10:244:1::/64".parse().unwrap();
        let exit6: IpNet = "::/0".parse().unwrap();
        let hb = ClientMsg::Heartbeat {
            endpoints: vec![],
            home_relay: None,
            nat: None,
            routes: vec![pods, pods6],
            exits: vec![exit6],
        };
        let text = String::from_utf8(hb.encode()).unwrap();
        assert!(text.contains(r#""routes":["10.244.1.0/24"]"#), "{text}");
        assert!(
            text.contains(r#""routes6":["fd00:10:244:1::/64"]"#),
            "{text}"
        );
        assert!(text.contains(r#""exits6":["::/0"]"#), "{text}");
        assert!(!text.contains(r#""exits":"#), "no empty IPv4 exits: {text}");
        assert_eq!(decode_client(&hb.encode()), Ok(hb));

        // What an older agent or controller reads of it: the IPv4 prefixes, nothing refused.
        #[derive(Deserialize)]
        struct Older {
            routes: Vec<Ipv4Net>,
        }
        #[derive(Deserialize)]
        struct OlderEnvelope {
            msg: Older,
        }
        let older: OlderEnvelope = serde_json::from_str(&text).unwrap();
        assert_eq!(
            older.msg.routes,
            vec!["10.244.1.0/24".parse::<Ipv4Net>().unwrap()]
        );

        // Both families count toward one bound.
        let many = ClientMsg::Heartbeat {
            endpoints: vec![],
            home_relay: None,
            nat: None,
            routes: [vec![pods; MAX_ROUTES / 2], vec![pods6; MAX_ROUTES / 2 + 1]].concat(),
            exits: vec![],
        };
        assert_eq!(
            decode_client(&many.encode()),
            Err(DecodeError::Bounds("routes"))
        );
        // An IPv4 prefix in the IPv6 field is malformed.
        let bad = br#"{"v":1,"msg":{"type":"heartbeat","endpoints":[],"routes6":["10.0.0.0/8"]}}"#;
        assert!(matches!(decode_client(bad), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn rejects_bad_relays() {
        let mut bad = relay("eu-1");
        bad.ticket.mac = "00".into();
        let m = ServerMsg::Relays { relays: vec![bad] };
        assert_eq!(
            decode_server(&m.encode()),
            Err(DecodeError::Bounds("ticket"))
        );
        let m = ServerMsg::Relays {
            relays: vec![relay("eu-1"); MAX_RELAYS + 1],
        };
        assert_eq!(
            decode_server(&m.encode()),
            Err(DecodeError::Bounds("relays"))
        );
        let m = ClientMsg::Heartbeat {
            endpoints: vec![],
            home_relay: Some("no spaces allowed".into()),
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        };
        assert_eq!(
            decode_client(&m.encode()),
            Err(DecodeError::Bounds("home_relay"))
        );
        let mut bad = relay("eu-1");
        bad.revoked = vec![bad.revoked[0].clone(); MAX_REVOCATIONS + 1];
        let m = ServerMsg::Relays { relays: vec![bad] };
        assert_eq!(
            decode_server(&m.encode()),
            Err(DecodeError::Bounds("revoked"))
        );
        // Fields older builds do not know are left out when empty, and ignored when present.
        let plain = ServerMsg::Relays {
            relays: vec![relay("us-1")],
        }
        .encode();
        assert!(!String::from_utf8_lossy(&plain).contains("revoked"));
        let newer = br#"{"v":1,"msg":{"type":"peers_changed","upsert":[{"key":"BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=","name":"a","address":"100.64.0.4","endpoints":[],"observed":"192.0.2.1:5","future":1}],"remove":[]}}"#;
        assert!(
            matches!(decode_server(newer), Ok(ServerMsg::PeersChanged { upsert, .. }) if upsert[0].observed.is_some())
        );
        // An older controller's welcome, without relays, still decodes.
        let old = br#"{"v":1,"msg":{"type":"welcome","network":"p","name":"n","address":"100.64.0.1","prefix_len":16,"peers":[]}}"#;
        assert!(matches!(decode_server(old), Ok(ServerMsg::Welcome(w)) if w.relays.is_empty()));
    }

    #[test]
    fn the_v6_overlay_is_optional_and_bounded() {
        let welcome = |address6: Option<&str>, prefix6: Option<&str>| {
            ServerMsg::Welcome(Welcome {
                address6: address6.map(|a| a.parse().unwrap()),
                prefix6: prefix6.map(|p| p.parse().unwrap()),
                ..bare_welcome()
            })
        };
        let ok = welcome(Some("fd5e:1234:5678::9"), Some("fd5e:1234:5678::/64"));
        let text = String::from_utf8(ok.encode()).unwrap();
        assert!(
            text.contains(r#""address6":"fd5e:1234:5678::9""#)
                && text.contains(r#""prefix6":"fd5e:1234:5678::/64""#),
            "{text}"
        );
        assert_eq!(decode_server(&ok.encode()), Ok(ok));
        // A network without IPv6: nothing on the wire, as from an older controller.
        let none = welcome(None, None);
        let text = String::from_utf8(none.encode()).unwrap();
        assert!(
            !text.contains("address6") && !text.contains("prefix6"),
            "{text}"
        );
        assert_eq!(decode_server(&none.encode()), Ok(none));
        for (address6, prefix6, field) in [
            // Outside its prefix, the prefix's own network address, no prefix at all.
            (Some("fd00:1::9"), Some("fd5e:1234:5678::/64"), "address6"),
            (
                Some("fd5e:1234:5678::"),
                Some("fd5e:1234:5678::/64"),
                "address6",
            ),
            (Some("fd5e:1234:5678::9"), None, "address6"),
            // Not a ULA, too long, host bits set.
            (None, Some("2001:db8::/64"), "prefix6"),
            (None, Some("fd5e:1234:5678::/120"), "prefix6"),
            (None, Some("fd5e:1234:5678::1/64"), "prefix6"),
        ] {
            assert_eq!(
                decode_server(&welcome(address6, prefix6).encode()),
                Err(DecodeError::Bounds(field)),
                "{address6:?} {prefix6:?}"
            );
        }
        let mut bad = peer(2);
        bad.address6 = Some("ff02::1".parse().unwrap());
        let m = ServerMsg::PeersChanged {
            upsert: vec![bad],
            remove: vec![],
        };
        assert_eq!(
            decode_server(&m.encode()),
            Err(DecodeError::Bounds("peer address6"))
        );
        // An older controller's peer: no address6.
        let old = br#"{"v":1,"msg":{"type":"peers_changed","upsert":[{"key":"BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=","name":"a","address":"100.64.0.4","endpoints":[]}],"remove":[]}}"#;
        assert!(
            matches!(decode_server(old), Ok(ServerMsg::PeersChanged { upsert, .. }) if upsert[0].address6.is_none())
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("node-1.example_a"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(!valid_name("a/b"));
        // Node names as Kubernetes takes them.
        for ok in ["node-b", "master.example.com", "a", "0x1", "cp1.k8s"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Node-b",
            "node_b",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            &"a".repeat(64),
        ] {
            assert!(!valid_node_name(bad), "{bad}");
            assert!(valid_node_name(&node_name_like(bad)), "{bad}");
        }
        assert_eq!(node_name_like("My_Host"), "my-host");
        assert_eq!(node_name_like("node-b"), "node-b");
    }

    #[test]
    fn names_for_several_nodes_are_bounded() {
        let alias = |name: &str, n: usize| NameAlias {
            name: name.into(),
            nodes: (0..n).map(|i| format!("cp{i}")).collect(),
            down: Vec::new(),
        };
        let names = |names| ServerMsg::Names { names }.encode();
        assert!(decode_server(&names(vec![alias("k8s-api", 3)])).is_ok());
        assert!(decode_server(&names(vec![alias("k8s-api", MAX_ALIAS_NODES + 1)])).is_err());
        assert!(decode_server(&names(vec![alias("K8s_api", 1)])).is_err());
        assert!(decode_server(&names(vec![alias("a", 1); MAX_ALIASES + 1])).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode_client(&bytes);
            let _ = decode_server(&bytes);
        }
    }
}
