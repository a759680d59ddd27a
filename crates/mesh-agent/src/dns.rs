//! A small authoritative DNS responder for the network's node names.
//!
//! Every node answers, on its own overlay address, the names of the nodes of its network:
//! `<node>`, `<node>.<network>.mesh`, the node's first label where that is unique, and the
//! network's alias names (one name for several nodes). A queries get the IPv4 overlay
//! addresses, AAAA queries the IPv6 ones (`address6`, on a network with an IPv6 overlay); a
//! name without an address of the asked family is NODATA (NOERROR, no records). It is authoritative for `.mesh` (any
//! other `.mesh` name is NXDOMAIN) and refuses everything else: it neither recurses nor
//! forwards, so it cannot be used as an open resolver.
//!
//! The core is sans-IO: [`NameTable::lookup`] resolves a name, [`answer`] turns the bytes of a
//! query into the bytes of a reply (or a reason to drop it). [`Responder`] is the tokio driver:
//! one UDP socket and one TCP listener on exactly the node's overlay address.
//!
//! The wire format is hickory-proto's; this module only decides what to answer.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

/// TTL of every A and AAAA record: short, because addresses follow the peer list (members of an alias
/// go on- and offline).
pub const TTL_SECS: u32 = 5;
/// Reply limit over UDP for a query without EDNS (RFC 1035).
pub const UDP_PLAIN_LIMIT: usize = 512;
/// Highest reply size over UDP whatever a query's EDNS asks for (the DNS flag day 2020 value:
/// it fits a 1280-byte IPv6 MTU without fragmentation).
pub const UDP_EDNS_LIMIT: usize = 1232;
/// Reply limit over TCP (the two-byte length prefix).
pub const TCP_LIMIT: usize = 65535;
/// The zone this responder is authoritative for.
const ZONE: &str = "mesh";
/// The port the responder listens on (on the overlay address only).
pub const PORT: u16 = 53;

/// Receive buffer of the UDP socket: larger than any query we accept, so that an oversized
/// datagram is seen as oversized rather than silently cut.
const UDP_BUFFER: usize = 4096;
/// Concurrent TCP connections; more are closed at once.
const TCP_MAX_CONNECTIONS: usize = 64;
/// A TCP connection is closed after this long without a complete query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// A TCP connection is closed after this many queries.
const TCP_MAX_QUERIES: usize = 32;

/// What the node's names resolve to: built by the daemon from the peer list, this node itself and the network's alias names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// The network's name; every name is also answered as `<name>.<network>.mesh`.
    pub network: String,
    /// Every node of the network, this one included.
    pub nodes: Vec<Node>,
    /// Names for several nodes (`mesh-controller name set NET k8s-api cp1 cp2 cp3`): alias name → the addresses to answer, both families (the daemon has already chosen the online members).
    pub aliases: Vec<(String, Vec<IpAddr>)>,
}

/// One node's name and overlay addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    /// An RFC 1123 subdomain (lowercase letters, digits, '-', '.'), e.g. `node-b` or
    /// `master.example.com`.
    pub name: String,
    /// The IPv4 overlay address (A records).
    pub address: Ipv4Addr,
    /// The IPv6 overlay address (AAAA records); `None` on a network without an IPv6 overlay.
    pub address6: Option<Ipv6Addr>,
}

impl Node {
    /// The node's addresses, IPv4 first.
    fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(IpAddr::V4(self.address)).chain(self.address6.map(IpAddr::V6))
    }
}

/// The result of [`NameTable::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The name exists; these are its addresses of both families (sorted, IPv4 first, without
    /// duplicates). Empty for an alias none of whose members is known: the name exists but has
    /// no address (NODATA).
    Found(Vec<IpAddr>),
    /// A `.mesh` name that does not exist: we are authoritative, so NXDOMAIN.
    NoSuchName,
    /// Not a name of ours: refuse it (no recursion, no forwarding).
    NotOurs,
}

impl NameTable {
    /// Resolves `qname` (case-insensitive, one trailing dot ignored).
    ///
    /// Precedence for a name: a node's full name, then an alias, then a node's first label
    /// (only where no other node has the same first label). The same names are answered
    /// inside the zone, as `<name>.<network>.mesh`.
    pub fn lookup(&self, qname: &str) -> Lookup {
        let name = qname
            .strip_suffix('.')
            .unwrap_or(qname)
            .to_ascii_lowercase();
        if name.is_empty() {
            return Lookup::NotOurs;
        }
        if let Some(base) = self.strip_zone(&name) {
            return match self.resolve(base) {
                Some((_, addrs)) => Lookup::Found(addrs),
                None => Lookup::NoSuchName,
            };
        }
        if let Some((_, addrs)) = self.resolve(&name) {
            return Lookup::Found(addrs);
        }
        let in_mesh = name == ZONE
            || name
                .strip_suffix(ZONE)
                .is_some_and(|rest| rest.ends_with('.'));
        if in_mesh {
            Lookup::NoSuchName
        } else {
            Lookup::NotOurs
        }
    }

    /// The lines of the managed /etc/hosts block: per address, every name that [`lookup`]
    /// answers with that address (each bare name and its `<name>.<network>.mesh` form).
    /// Sorted by address, the IPv4 lines first, then the IPv6 ones. Within a line the node's own full names come first (the first name
    /// of a hosts line is the canonical one, which reverse lookups return), then its short
    /// names, then alias names, each group sorted by name. Addresses without a name are left
    /// out.
    ///
    /// [`lookup`]: NameTable::lookup
    pub fn hosts_entries(&self) -> Vec<(IpAddr, Vec<String>)> {
        let mut candidates: Vec<String> = Vec::new();
        for node in &self.nodes {
            let name = node.name.to_ascii_lowercase();
            candidates.push(first_label(&name).to_owned());
            candidates.push(name);
        }
        for (name, _) in &self.aliases {
            candidates.push(name.to_ascii_lowercase());
        }
        candidates.retain(|name| !name.is_empty());
        candidates.sort();
        candidates.dedup();

        let mut by_addr: BTreeMap<IpAddr, Vec<(NameKind, String)>> = BTreeMap::new();
        for name in candidates {
            let Some((kind, addrs)) = self.resolve(&name) else {
                continue;
            };
            let zoned = self.zoned(&name);
            for addr in addrs {
                let names = by_addr.entry(addr).or_default();
                names.push((kind, name.clone()));
                if let Some(zoned) = &zoned {
                    names.push((kind, zoned.clone()));
                }
            }
        }
        by_addr
            .into_iter()
            .map(|(addr, mut names)| {
                names.sort();
                names.dedup();
                (addr, names.into_iter().map(|(_, name)| name).collect())
            })
            .collect()
    }

    /// `<name>.<network>.mesh`, or `None` when the network has no name.
    fn zoned(&self, name: &str) -> Option<String> {
        if self.network.is_empty() {
            return None;
        }
        Some(format!(
            "{name}.{}.{ZONE}",
            self.network.to_ascii_lowercase()
        ))
    }

    /// The part of a lowercase name before `.<network>.mesh`, if it is in this network's zone.
    fn strip_zone<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.network.is_empty() {
            return None;
        }
        let rest = name.strip_suffix(ZONE)?.strip_suffix('.')?;
        let base = rest.strip_suffix(self.network.to_ascii_lowercase().as_str())?;
        let base = base.strip_suffix('.')?;
        (!base.is_empty()).then_some(base)
    }

    /// The addresses of a bare lowercase name (no zone suffix), by the precedence of
    /// [`lookup`](NameTable::lookup).
    fn resolve(&self, name: &str) -> Option<(NameKind, Vec<IpAddr>)> {
        let full: Vec<IpAddr> = self
            .nodes
            .iter()
            .filter(|node| node.name.eq_ignore_ascii_case(name))
            .flat_map(Node::addresses)
            .collect();
        if !full.is_empty() {
            return Some((NameKind::Node, sorted(full)));
        }
        let mut alias_found = false;
        let mut alias_addrs = Vec::new();
        for (alias, addrs) in &self.aliases {
            if alias.eq_ignore_ascii_case(name) {
                alias_found = true;
                alias_addrs.extend_from_slice(addrs);
            }
        }
        if alias_found {
            return Some((NameKind::Alias, sorted(alias_addrs)));
        }
        // A first label never contains a dot; a dotted name is only ever a full name.
        if name.contains('.') {
            return None;
        }
        let mut owners = self
            .nodes
            .iter()
            .filter(|node| first_label(&node.name).eq_ignore_ascii_case(name));
        match (owners.next(), owners.next()) {
            (Some(node), None) => Some((NameKind::FirstLabel, node.addresses().collect())),
            _ => None,
        }
    }
}

/// Why a name resolves, in the order of a hosts line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum NameKind {
    /// A node's full name.
    Node,
    /// A node's unique first label.
    FirstLabel,
    /// An alias of several nodes.
    Alias,
}

/// The part of a name before its first dot.
fn first_label(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn sorted(mut addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    addrs.sort();
    addrs.dedup();
    addrs
}

/// What [`answer`] decided for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes back to the querier.
    Reply {
        /// The encoded reply, never longer than the limit it was built for.
        bytes: Vec<u8>,
        /// What kind of reply it is (for the counters).
        outcome: Outcome,
        /// The full reply did not fit: the answers were left out and TC is set.
        truncated: bool,
    },
    /// Send nothing; count it.
    Drop(DropReason),
}

/// The kind of a reply, one counter each in [`DnsStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// NOERROR with at least one A or AAAA record.
    Answered,
    /// NOERROR without records: the name exists, not with that type.
    NoData,
    /// NXDOMAIN: a `.mesh` name that does not exist.
    NxDomain,
    /// REFUSED: not a name of ours, or a zone transfer.
    Refused,
    /// FORMERR, NOTIMP or BADVERS: a query we do not serve.
    Error,
}

/// Why a query got no reply at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The bytes are not a DNS message.
    Malformed,
    /// The message is a response (QR=1): answering it could start a loop between servers.
    Response,
    /// A UDP query over 512 bytes whose EDNS does not announce a payload that large.
    Oversized,
    /// Even the truncated reply does not fit the caller's limit (a limit below any sane size).
    ReplyTooLarge,
}

/// How large a reply may be.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Exactly this many bytes.
    Fixed(usize),
    /// UDP: 512 bytes, or the query's EDNS payload size capped at [`UDP_EDNS_LIMIT`].
    Udp,
}

/// Answers one query with a reply of at most `max_len` bytes (the caller has chosen the
/// transport's limit; [`answer_udp`] derives it from the query for UDP).
pub fn answer(query: &[u8], table: &NameTable, max_len: usize) -> Answer {
    respond(query, table, Limit::Fixed(max_len))
}

/// Answers one query that came in a UDP datagram: queries over 512 bytes are accepted only
/// when their EDNS payload size covers them; the reply is bounded by 512 bytes, or with EDNS
/// by the announced payload size capped at [`UDP_EDNS_LIMIT`].
pub fn answer_udp(query: &[u8], table: &NameTable) -> Answer {
    respond(query, table, Limit::Udp)
}

fn respond(query: &[u8], table: &NameTable, limit: Limit) -> Answer {
    let Ok(request) = Message::from_vec(query) else {
        return Answer::Drop(DropReason::Malformed);
    };
    if request.message_type() != MessageType::Query {
        return Answer::Drop(DropReason::Response);
    }
    let max_len = match limit {
        Limit::Fixed(max_len) => max_len,
        Limit::Udp => {
            let announced = request
                .extensions()
                .as_ref()
                .map(|edns| usize::from(edns.max_payload()));
            if query.len() > UDP_PLAIN_LIMIT && announced.is_none_or(|size| query.len() > size) {
                return Answer::Drop(DropReason::Oversized);
            }
            announced.map_or(UDP_PLAIN_LIMIT, |size| {
                size.clamp(UDP_PLAIN_LIMIT, UDP_EDNS_LIMIT)
            })
        }
    };

    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(false);
    if let Some(edns) = request.extensions() {
        let mut ours = Edns::new();
        ours.set_max_payload(UDP_EDNS_LIMIT as u16).set_version(0);
        reply.set_edns(ours);
        if edns.version() > 0 {
            // RFC 6891 6.1.3: we speak EDNS version 0 only.
            reply.set_response_code(ResponseCode::BADVERS);
            return encode(reply, Outcome::Error, max_len);
        }
    }
    if request.op_code() != OpCode::Query {
        reply.set_response_code(ResponseCode::NotImp);
        return encode(reply, Outcome::Error, max_len);
    }
    let [question] = request.queries() else {
        reply.set_response_code(ResponseCode::FormErr);
        return encode(reply, Outcome::Error, max_len);
    };
    reply.add_query(question.clone());
    let outcome = resolve_question(question, table, &mut reply);
    encode(reply, outcome, max_len)
}

/// Fills `reply` for one question and says what kind of reply it became.
fn resolve_question(question: &Query, table: &NameTable, reply: &mut Message) -> Outcome {
    let class_ok = matches!(question.query_class(), DNSClass::IN | DNSClass::ANY);
    let transfer = matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR);
    if !class_ok || transfer {
        reply.set_response_code(ResponseCode::Refused);
        return Outcome::Refused;
    }
    match table.lookup(&question.name().to_ascii()) {
        Lookup::NotOurs => {
            reply.set_response_code(ResponseCode::Refused);
            Outcome::Refused
        }
        Lookup::NoSuchName => {
            reply
                .set_authoritative(true)
                .set_response_code(ResponseCode::NXDomain);
            Outcome::NxDomain
        }
        Lookup::Found(addrs) => {
            reply
                .set_authoritative(true)
                .set_response_code(ResponseCode::NoError);
            let qtype = question.query_type();
            let wants_a = matches!(qtype, RecordType::A | RecordType::ANY);
            let wants_aaaa = matches!(qtype, RecordType::AAAA | RecordType::ANY);
            let records: Vec<RData> = addrs
                .into_iter()
                .filter_map(|addr| match addr {
                    IpAddr::V4(v4) if wants_a => Some(RData::A(A(v4))),
                    IpAddr::V6(v6) if wants_aaaa => Some(RData::AAAA(AAAA(v6))),
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                return Outcome::NoData;
            }
            for rdata in records {
                reply.add_answer(Record::from_rdata(question.name().clone(), TTL_SECS, rdata));
            }
            Outcome::Answered
        }
    }
}

/// Encodes `reply`; when it is longer than `max_len`, encodes it again without its answers
/// and with TC=1 (the querier retries over TCP).
fn encode(reply: Message, outcome: Outcome, max_len: usize) -> Answer {
    let bytes = match reply.to_vec() {
        Ok(bytes) => bytes,
        Err(err) => {
            debug!(%err, "could not encode a DNS reply");
            return Answer::Drop(DropReason::ReplyTooLarge);
        }
    };
    if bytes.len() <= max_len {
        return Answer::Reply {
            bytes,
            outcome,
            truncated: false,
        };
    }
    match reply.truncate().to_vec() {
        Ok(bytes) if bytes.len() <= max_len => Answer::Reply {
            bytes,
            outcome,
            truncated: true,
        },
        _ => Answer::Drop(DropReason::ReplyTooLarge),
    }
}

/// The responder's counters (for `mesh status --json` and the metrics).
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Every message received, whether answered or dropped.
    pub queries: AtomicU64,
    /// NOERROR replies with at least one address.
    pub answered: AtomicU64,
    /// NOERROR replies without records (the name exists, not with that type).
    pub nodata: AtomicU64,
    /// NXDOMAIN replies.
    pub nxdomain: AtomicU64,
    /// REFUSED replies (names not ours, zone transfers).
    pub refused: AtomicU64,
    /// FORMERR, NOTIMP and BADVERS replies.
    pub errors: AtomicU64,
    /// Messages dropped without a reply: undecodable, responses, oversized.
    pub dropped_malformed: AtomicU64,
    /// Replies sent truncated (TC=1).
    pub truncated: AtomicU64,
}

/// A copy of [`DnsStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsStatsSnapshot {
    /// See [`DnsStats::queries`].
    pub queries: u64,
    /// See [`DnsStats::answered`].
    pub answered: u64,
    /// See [`DnsStats::nodata`].
    pub nodata: u64,
    /// See [`DnsStats::nxdomain`].
    pub nxdomain: u64,
    /// See [`DnsStats::refused`].
    pub refused: u64,
    /// See [`DnsStats::errors`].
    pub errors: u64,
    /// See [`DnsStats::dropped_malformed`].
    pub dropped_malformed: u64,
    /// See [`DnsStats::truncated`].
    pub truncated: u64,
}

impl DnsStats {
    /// Counts one received message and what [`answer`] made of it.
    pub fn record(&self, answer: &Answer) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let counter = match answer {
            Answer::Drop(_) => &self.dropped_malformed,
            Answer::Reply {
                outcome, truncated, ..
            } => {
                if *truncated {
                    self.truncated.fetch_add(1, Ordering::Relaxed);
                }
                match outcome {
                    Outcome::Answered => &self.answered,
                    Outcome::NoData => &self.nodata,
                    Outcome::NxDomain => &self.nxdomain,
                    Outcome::Refused => &self.refused,
                    Outcome::Error => &self.errors,
                }
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> DnsStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DnsStatsSnapshot {
            queries: load(&self.queries),
            answered: load(&self.answered),
            nodata: load(&self.nodata),
            nxdomain: load(&self.nxdomain),
            refused: load(&self.refused),
            errors: load(&self.errors),
            dropped_malformed: load(&self.dropped_malformed),
            truncated: load(&self.truncated),
        }
    }
}

impl Serialize for DnsStats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(serializer)
    }
}

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The caller asked for 0.0.0.0 (or ::): the responder binds only the node's own address.
    #[error(
        "the DNS responder binds only a specific address (the node's overlay address), not {0}"
    )]
    Unspecified(SocketAddr),
    /// Another program holds the port on this address (or on all addresses).
    #[error("port {port} on {ip} is taken ({proto}; another DNS server bound to all addresses? bind it to its own addresses, or start mesh with --no-dns)", port = .addr.port(), ip = .addr.ip())]
    PortTaken {
        /// The address we tried.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
    },
    /// The port is privileged and we lack the right.
    #[error("binding port {port} on {ip} needs root or CAP_NET_BIND_SERVICE (or start mesh with --no-dns)", port = .addr.port(), ip = .addr.ip())]
    PermissionDenied {
        /// The address we tried.
        addr: SocketAddr,
    },
    /// The address is not on any local interface.
    #[error("{ip} is not an address of this machine (is the overlay interface up with its address?)", ip = .addr.ip())]
    AddressNotAvailable {
        /// The address we tried.
        addr: SocketAddr,
    },
    /// Any other socket error.
    #[error("could not bind the DNS responder's {proto} socket on {addr}: {source}")]
    Bind {
        /// The address we tried.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
}

impl DnsError {
    fn from_bind(addr: SocketAddr, proto: &'static str, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::AddrInUse => Self::PortTaken { addr, proto },
            std::io::ErrorKind::PermissionDenied => Self::PermissionDenied { addr },
            std::io::ErrorKind::AddrNotAvailable => Self::AddressNotAvailable { addr },
            _ => Self::Bind {
                addr,
                proto,
                source,
            },
        }
    }
}

/// The DNS responder's sockets: UDP and TCP on one address. [`Responder::run`] serves them.
#[derive(Debug)]
pub struct Responder {
    udp: UdpSocket,
    tcp: TcpListener,
    addr: SocketAddr,
}

impl Responder {
    /// Binds UDP and TCP on exactly `addr` (the node's overlay address, port 53). With port 0
    /// both get the same free port. A busy port is an error now, not a silent failure later.
    pub async fn bind(addr: SocketAddr) -> Result<Responder, DnsError> {
        if addr.ip().is_unspecified() {
            return Err(DnsError::Unspecified(addr));
        }
        // With port 0 the kernel picks a free UDP port which may be taken for TCP: try again.
        let attempts = if addr.port() == 0 { 8 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|err| DnsError::from_bind(addr, "UDP", err))?;
            let bound = udp
                .local_addr()
                .map_err(|err| DnsError::from_bind(addr, "UDP", err))?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    info!(addr = %bound, "DNS responder bound (UDP and TCP)");
                    return Ok(Responder {
                        udp,
                        tcp,
                        addr: bound,
                    });
                }
                Err(err) => last_err = Some(DnsError::from_bind(bound, "TCP", err)),
            }
        }
        Err(last_err.unwrap_or(DnsError::PortTaken { addr, proto: "TCP" }))
    }

    /// The address both sockets are bound to (with the actual port when bound with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves queries until `shutdown` becomes true (or its sender goes away). Each query is
    /// answered from the table `table` holds at that moment.
    pub async fn run(
        self,
        table: watch::Receiver<Arc<NameTable>>,
        stats: Arc<DnsStats>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Responder { udp, tcp, addr } = self;
        let mut buf = vec![0u8; UDP_BUFFER];
        let mut connections: JoinSet<()> = JoinSet::new();
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                received = udp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        let current = Arc::clone(&table.borrow());
                        let result = answer_udp(&buf[..len], &current);
                        stats.record(&result);
                        match result {
                            Answer::Reply { bytes, .. } => {
                                if let Err(err) = udp.send_to(&bytes, from).await {
                                    debug!(%from, %err, "could not send a DNS reply");
                                }
                            }
                            Answer::Drop(reason) => trace!(%from, ?reason, "DNS query dropped"),
                        }
                    }
                    Err(err) => {
                        debug!(%addr, %err, "DNS UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                accepted = tcp.accept() => match accepted {
                    Ok((stream, from)) => {
                        if connections.len() >= TCP_MAX_CONNECTIONS {
                            trace!(%from, "too many DNS TCP connections; closing this one");
                            drop(stream);
                        } else {
                            connections.spawn(serve_tcp(stream, table.clone(), Arc::clone(&stats)));
                        }
                    }
                    Err(err) => {
                        warn!(%addr, %err, "DNS TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.shutdown().await;
        info!(%addr, "DNS responder stopped");
    }
}

/// One TCP connection: length-prefixed queries, at most [`TCP_MAX_QUERIES`], closed after
/// [`TCP_IDLE`] without a complete query (or a reply the peer does not take).
async fn serve_tcp(
    mut stream: TcpStream,
    table: watch::Receiver<Arc<NameTable>>,
    stats: Arc<DnsStats>,
) {
    let mut buf = Vec::new();
    for _ in 0..TCP_MAX_QUERIES {
        let read = tokio::time::timeout(TCP_IDLE, async {
            let len = usize::from(stream.read_u16().await?);
            buf.resize(len, 0);
            stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let current = Arc::clone(&table.borrow());
        let result = answer(&buf, &current, TCP_LIMIT);
        stats.record(&result);
        let Answer::Reply { bytes, .. } = result else {
            // A peer that sends garbage over TCP gets the connection closed.
            return;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let write = tokio::time::timeout(TCP_IDLE, async {
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&bytes).await
        })
        .await;
        if !matches!(write, Ok(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use std::str::FromStr as _;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, last))
    }

    fn v6(last: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd6d, 0x6573, 0x6800, 0, 0, 0, 0, last))
    }

    /// A node with its IPv4 address `100.64.0.<last>` and, with `dual`, its IPv6 address
    /// `fd6d:6573:6800::<last>`.
    fn node(name: &str, last: u8, dual: bool) -> Node {
        let address6 = dual.then(|| match v6(last.into()) {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => unreachable!(),
        });
        Node {
            name: name.into(),
            address: Ipv4Addr::new(100, 64, 0, last),
            address6,
        }
    }

    fn table() -> NameTable {
        NameTable {
            network: "prod".into(),
            nodes: vec![
                node("node-a", 1, true),
                node("node-b", 2, true),
                node("master", 3, false),
                node("master.example.com", 4, false),
                node("web.eu.example.com", 5, true),
                node("db.one.example", 6, false),
                node("db.two.example", 7, false),
            ],
            aliases: vec![("k8s-api".into(), vec![v6(2), v4(2), v4(1), v6(1)])],
        }
    }

    #[test]
    fn full_names_with_dots() {
        let t = table();
        assert_eq!(t.lookup("master.example.com"), Lookup::Found(vec![v4(4)]));
        assert_eq!(
            t.lookup("master.example.com.prod.mesh"),
            Lookup::Found(vec![v4(4)])
        );
        assert_eq!(t.lookup("node-a"), Lookup::Found(vec![v4(1), v6(1)]));
        assert_eq!(
            t.lookup("node-a.prod.mesh"),
            Lookup::Found(vec![v4(1), v6(1)])
        );
    }

    #[test]
    fn unique_first_labels() {
        let t = table();
        assert_eq!(t.lookup("web"), Lookup::Found(vec![v4(5), v6(5)]));
        assert_eq!(t.lookup("web.prod.mesh"), Lookup::Found(vec![v4(5), v6(5)]));
        // Two nodes start with `db`: neither gets the short name.
        assert_eq!(t.lookup("db"), Lookup::NotOurs);
        assert_eq!(t.lookup("db.prod.mesh"), Lookup::NoSuchName);
        assert_eq!(t.lookup("db.one.example"), Lookup::Found(vec![v4(6)]));
    }

    #[test]
    fn full_name_wins_over_another_nodes_first_label() {
        let t = table();
        assert_eq!(t.lookup("master"), Lookup::Found(vec![v4(3)]));
        assert_eq!(t.lookup("master.prod.mesh"), Lookup::Found(vec![v4(3)]));
        // Without the node `master`, the short name is master.example.com's.
        let mut t = t;
        t.nodes.retain(|node| node.name != "master");
        assert_eq!(t.lookup("master"), Lookup::Found(vec![v4(4)]));
    }

    #[test]
    fn aliases() {
        let t = table();
        assert_eq!(
            t.lookup("k8s-api"),
            Lookup::Found(vec![v4(1), v4(2), v6(1), v6(2)])
        );
        assert_eq!(
            t.lookup("K8S-API.prod.mesh."),
            Lookup::Found(vec![v4(1), v4(2), v6(1), v6(2)])
        );
        let mut t = t;
        t.aliases = vec![("k8s-api".into(), vec![])];
        assert_eq!(t.lookup("k8s-api"), Lookup::Found(vec![]));
    }

    #[test]
    fn mesh_zone_is_ours_and_the_rest_is_not() {
        let t = table();
        assert_eq!(t.lookup("nobody.prod.mesh"), Lookup::NoSuchName);
        assert_eq!(t.lookup("prod.mesh"), Lookup::NoSuchName);
        assert_eq!(t.lookup("node-a.other.mesh"), Lookup::NoSuchName);
        assert_eq!(t.lookup("mesh"), Lookup::NoSuchName);
        assert_eq!(t.lookup("example.com"), Lookup::NotOurs);
        assert_eq!(t.lookup("nobody"), Lookup::NotOurs);
        assert_eq!(t.lookup("notmesh"), Lookup::NotOurs);
        assert_eq!(t.lookup("."), Lookup::NotOurs);
        assert_eq!(t.lookup(""), Lookup::NotOurs);
    }

    #[test]
    fn case_and_one_trailing_dot() {
        let t = table();
        assert_eq!(t.lookup("Node-B."), Lookup::Found(vec![v4(2), v6(2)]));
        assert_eq!(
            t.lookup("NODE-B.PROD.MESH."),
            Lookup::Found(vec![v4(2), v6(2)])
        );
        assert_eq!(t.lookup("node-b.."), Lookup::NotOurs);
    }

    #[test]
    fn hosts_entries_match_lookup() {
        let t = table();
        let entries = t.hosts_entries();
        let want: Vec<(IpAddr, Vec<String>)> = vec![
            (
                v4(1),
                vec!["node-a", "node-a.prod.mesh", "k8s-api", "k8s-api.prod.mesh"],
            ),
            (
                v4(2),
                vec!["node-b", "node-b.prod.mesh", "k8s-api", "k8s-api.prod.mesh"],
            ),
            (v4(3), vec!["master", "master.prod.mesh"]),
            (
                v4(4),
                vec!["master.example.com", "master.example.com.prod.mesh"],
            ),
            (
                v4(5),
                vec![
                    "web.eu.example.com",
                    "web.eu.example.com.prod.mesh",
                    "web",
                    "web.prod.mesh",
                ],
            ),
            (v4(6), vec!["db.one.example", "db.one.example.prod.mesh"]),
            (v4(7), vec!["db.two.example", "db.two.example.prod.mesh"]),
            // The IPv6 lines after the IPv4 ones, with the same names.
            (
                v6(1),
                vec!["node-a", "node-a.prod.mesh", "k8s-api", "k8s-api.prod.mesh"],
            ),
            (
                v6(2),
                vec!["node-b", "node-b.prod.mesh", "k8s-api", "k8s-api.prod.mesh"],
            ),
            (
                v6(5),
                vec![
                    "web.eu.example.com",
                    "web.eu.example.com.prod.mesh",
                    "web",
                    "web.prod.mesh",
                ],
            ),
        ]
        .into_iter()
        .map(|(addr, names)| (addr, names.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(entries, want);
        for (addr, names) in &entries {
            for name in names {
                match t.lookup(name) {
                    Lookup::Found(addrs) => assert!(addrs.contains(addr), "{name}"),
                    other => panic!("{name}: {other:?}"),
                }
            }
        }
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut msg = Message::new();
        msg.set_id(0x1234)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_str(name).expect("name"), qtype));
        msg
    }

    fn reply(answer: Answer) -> (Message, Outcome, bool) {
        match answer {
            Answer::Reply {
                bytes,
                outcome,
                truncated,
            } => (
                Message::from_vec(&bytes).expect("reply decodes"),
                outcome,
                truncated,
            ),
            Answer::Drop(reason) => panic!("dropped: {reason:?}"),
        }
    }

    fn ask(msg: &Message) -> (Message, Outcome, bool) {
        reply(answer_udp(&msg.to_vec().expect("encode"), &table()))
    }

    fn a_records(msg: &Message) -> Vec<IpAddr> {
        msg.answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(A(addr)) => Some(IpAddr::V4(*addr)),
                _ => None,
            })
            .collect()
    }

    fn aaaa_records(msg: &Message) -> Vec<IpAddr> {
        msg.answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::AAAA(AAAA(addr)) => Some(IpAddr::V6(*addr)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_for_a_node() {
        let (msg, outcome, truncated) = ask(&query("node-b.", RecordType::A));
        assert_eq!(outcome, Outcome::Answered);
        assert!(!truncated);
        assert_eq!(msg.id(), 0x1234);
        assert_eq!(msg.message_type(), MessageType::Response);
        assert_eq!(msg.response_code(), ResponseCode::NoError);
        assert!(msg.authoritative());
        assert!(msg.recursion_desired());
        assert!(!msg.recursion_available());
        assert_eq!(msg.queries(), query("node-b.", RecordType::A).queries());
        assert_eq!(a_records(&msg), vec![v4(2)]);
        assert_eq!(msg.answers()[0].ttl(), TTL_SECS);
        assert!(msg.extensions().is_none());
    }

    #[test]
    fn a_for_first_label_in_zone_and_any() {
        let (msg, outcome, _) = ask(&query("web.prod.mesh.", RecordType::A));
        assert_eq!(outcome, Outcome::Answered);
        assert_eq!(a_records(&msg), vec![v4(5)]);
        let (msg, _, _) = ask(&query("k8s-api.", RecordType::ANY));
        assert_eq!(a_records(&msg), vec![v4(1), v4(2)]);
        assert_eq!(aaaa_records(&msg), vec![v6(1), v6(2)]);
    }

    #[test]
    fn a_answers_only_ipv4() {
        let (msg, _, _) = ask(&query("node-a.prod.mesh.", RecordType::A));
        assert_eq!(a_records(&msg), vec![v4(1)]);
        assert_eq!(msg.answers().len(), 1);
    }

    #[test]
    fn aaaa_for_a_node_a_short_name_and_an_alias() {
        for (name, want) in [
            ("node-a.", vec![v6(1)]),
            ("node-a.prod.mesh.", vec![v6(1)]),
            ("WEB.prod.mesh.", vec![v6(5)]),
            ("k8s-api.", vec![v6(1), v6(2)]),
            ("k8s-api.prod.mesh.", vec![v6(1), v6(2)]),
        ] {
            let (msg, outcome, truncated) = ask(&query(name, RecordType::AAAA));
            assert_eq!(outcome, Outcome::Answered, "{name}");
            assert!(!truncated);
            assert_eq!(msg.response_code(), ResponseCode::NoError);
            assert!(msg.authoritative());
            assert_eq!(aaaa_records(&msg), want, "{name}");
            assert!(a_records(&msg).is_empty(), "{name}");
            assert_eq!(msg.answers()[0].ttl(), TTL_SECS);
        }
    }

    #[test]
    fn aaaa_without_ipv6_is_nodata() {
        // A node without address6 (a network created with --cidr6 off).
        let (msg, outcome, _) = ask(&query("master.prod.mesh.", RecordType::AAAA));
        assert_eq!(outcome, Outcome::NoData);
        assert_eq!(msg.response_code(), ResponseCode::NoError);
        assert!(msg.authoritative());
        assert!(msg.answers().is_empty());
        // An alias whose members have no IPv6 address.
        let mut t = table();
        t.aliases.push(("v4-only".into(), vec![v4(3), v4(4)]));
        let bytes = query("v4-only.", RecordType::AAAA)
            .to_vec()
            .expect("encode");
        let (msg, outcome, _) = reply(answer_udp(&bytes, &t));
        assert_eq!(outcome, Outcome::NoData);
        assert_eq!(msg.response_code(), ResponseCode::NoError);
        assert!(msg.answers().is_empty());
        // Still NXDOMAIN for a name that does not exist.
        let (msg, outcome, _) = ask(&query("nobody.prod.mesh.", RecordType::AAAA));
        assert_eq!(outcome, Outcome::NxDomain);
        assert_eq!(msg.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn other_types_are_nodata() {
        let (msg, outcome, _) = ask(&query("node-a.prod.mesh.", RecordType::MX));
        assert_eq!(outcome, Outcome::NoData);
        assert_eq!(msg.response_code(), ResponseCode::NoError);
        assert!(msg.answers().is_empty());
    }

    #[test]
    fn unknown_mesh_name_is_nxdomain() {
        let (msg, outcome, _) = ask(&query("nobody.prod.mesh.", RecordType::A));
        assert_eq!(outcome, Outcome::NxDomain);
        assert_eq!(msg.response_code(), ResponseCode::NXDomain);
        assert!(msg.authoritative());
    }

    #[test]
    fn other_names_are_refused() {
        let (msg, outcome, _) = ask(&query("example.com.", RecordType::A));
        assert_eq!(outcome, Outcome::Refused);
        assert_eq!(msg.response_code(), ResponseCode::Refused);
        assert!(!msg.authoritative());
        assert!(msg.answers().is_empty());
        let (msg, _, _) = ask(&query("node-a.", RecordType::AXFR));
        assert_eq!(msg.response_code(), ResponseCode::Refused);
    }

    #[test]
    fn two_questions_are_formerr() {
        let mut msg = query("node-a.", RecordType::A);
        msg.add_query(Query::query(
            Name::from_str("node-b.").expect("name"),
            RecordType::A,
        ));
        let (msg, outcome, _) = ask(&msg);
        assert_eq!(outcome, Outcome::Error);
        assert_eq!(msg.response_code(), ResponseCode::FormErr);
        let mut none = query("node-a.", RecordType::A);
        none.take_queries();
        assert_eq!(ask(&none).0.response_code(), ResponseCode::FormErr);
    }

    #[test]
    fn other_opcodes_are_notimp() {
        let mut msg = query("node-a.", RecordType::A);
        msg.set_op_code(OpCode::Update);
        let (msg, outcome, _) = ask(&msg);
        assert_eq!(outcome, Outcome::Error);
        assert_eq!(msg.response_code(), ResponseCode::NotImp);
        assert_eq!(msg.op_code(), OpCode::Update);
    }

    #[test]
    fn garbage_and_responses_are_dropped() {
        let t = table();
        assert_eq!(
            answer_udp(b"\x01\x02\x03", &t),
            Answer::Drop(DropReason::Malformed)
        );
        assert_eq!(answer_udp(&[], &t), Answer::Drop(DropReason::Malformed));
        let mut msg = query("node-a.", RecordType::A);
        msg.set_message_type(MessageType::Response);
        let bytes = msg.to_vec().expect("encode");
        assert_eq!(answer_udp(&bytes, &t), Answer::Drop(DropReason::Response));
        assert_eq!(
            answer(&bytes, &t, TCP_LIMIT),
            Answer::Drop(DropReason::Response)
        );
    }

    fn big_alias_table() -> NameTable {
        let mut t = table();
        t.aliases
            .push(("all".into(), (1..=60).map(v4).collect::<Vec<_>>()));
        t
    }

    #[test]
    fn too_many_addresses_truncate() {
        let t = big_alias_table();
        let bytes = query("all.", RecordType::A).to_vec().expect("encode");
        let (msg, outcome, truncated) = reply(answer_udp(&bytes, &t));
        assert!(truncated);
        assert_eq!(outcome, Outcome::Answered);
        assert!(msg.truncated());
        assert!(msg.answers().is_empty());
        assert_eq!(msg.queries().len(), 1);
        // Over TCP all 60 fit.
        let (msg, _, truncated) = reply(answer(&bytes, &t, TCP_LIMIT));
        assert!(!truncated);
        assert_eq!(a_records(&msg).len(), 60);
        // A small explicit limit truncates too; an absurd one drops.
        let (msg, _, truncated) = reply(answer(&bytes, &t, 100));
        assert!(truncated && msg.truncated());
        assert_eq!(
            answer(&bytes, &t, 10),
            Answer::Drop(DropReason::ReplyTooLarge)
        );
    }

    fn with_edns(mut msg: Message, payload: u16) -> Message {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        msg.set_edns(edns);
        msg
    }

    #[test]
    fn edns_is_echoed_and_raises_the_udp_limit() {
        let (msg, _, _) = ask(&with_edns(query("node-a.", RecordType::A), 4096));
        let edns = msg.extensions().as_ref().expect("OPT in the reply");
        assert_eq!(edns.version(), 0);
        assert_eq!(usize::from(edns.max_payload()), UDP_EDNS_LIMIT);
        // 60 A records (16 bytes each, the name compressed) fit in 1232 bytes but not in 512.
        let t = big_alias_table();
        let bytes = with_edns(query("all.", RecordType::A), 4096)
            .to_vec()
            .expect("encode");
        let (msg, _, truncated) = reply(answer_udp(&bytes, &t));
        assert!(!truncated, "fits 1232");
        assert_eq!(a_records(&msg).len(), 60);
        // An EDNS payload below 512 still allows 512.
        let bytes = with_edns(query("k8s-api.", RecordType::A), 100)
            .to_vec()
            .expect("encode");
        let (msg, _, truncated) = reply(answer_udp(&bytes, &t));
        assert!(!truncated);
        assert_eq!(a_records(&msg).len(), 2);
    }

    #[test]
    fn edns_version_above_zero_is_badvers() {
        let mut msg = with_edns(query("node-a.", RecordType::A), 1232);
        if let Some(edns) = msg.extensions_mut() {
            edns.set_version(1);
        }
        let (msg, outcome, _) = ask(&msg);
        assert_eq!(outcome, Outcome::Error);
        // RCODE 16 is both BADVERS and BADSIG; hickory decodes it as the latter.
        assert_eq!(u16::from(msg.response_code()), 16);
        assert!(msg.extensions().is_some());
    }

    #[test]
    fn oversized_udp_queries_need_edns() {
        let t = table();
        let mut padded = query("node-a.", RecordType::A).to_vec().expect("encode");
        // Trailing bytes after the message are ignored by the decoder: pad past 512.
        padded.resize(600, 0);
        assert_eq!(answer_udp(&padded, &t), Answer::Drop(DropReason::Oversized));
        let mut padded = with_edns(query("node-a.", RecordType::A), 1232)
            .to_vec()
            .expect("encode");
        padded.resize(600, 0);
        assert!(matches!(answer_udp(&padded, &t), Answer::Reply { .. }));
    }

    #[test]
    fn stats_count_each_kind() {
        let stats = DnsStats::default();
        let t = table();
        for (name, qtype) in [
            ("node-a.", RecordType::A),
            ("master.", RecordType::AAAA),
            ("x.prod.mesh.", RecordType::A),
            ("example.com.", RecordType::A),
        ] {
            let bytes = query(name, qtype).to_vec().expect("encode");
            stats.record(&answer_udp(&bytes, &t));
        }
        stats.record(&answer_udp(b"junk", &t));
        let snap = stats.snapshot();
        assert_eq!(
            snap,
            DnsStatsSnapshot {
                queries: 5,
                answered: 1,
                nodata: 1,
                nxdomain: 1,
                refused: 1,
                errors: 0,
                dropped_malformed: 1,
                truncated: 0,
            }
        );
        let json = serde_json::to_value(&stats).expect("json");
        assert_eq!(json["queries"], 5);
    }

    proptest::proptest! {
        #[test]
        fn answer_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            let t = table();
            for result in [answer_udp(&bytes, &t), answer(&bytes, &t, 512), answer(&bytes, &t, 0)] {
                if let Answer::Reply { bytes: reply, .. } = result {
                    proptest::prop_assert!(reply.len() <= UDP_EDNS_LIMIT);
                    proptest::prop_assert!(Message::from_vec(&reply).is_ok());
                }
            }
        }

        #[test]
        fn answer_never_panics_on_mutated_queries(
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 1..8)
        ) {
            let t = table();
            let mut bytes = with_edns(query("node-a.prod.mesh.", RecordType::A), 1232)
                .to_vec()
                .expect("encode");
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            let _ = answer_udp(&bytes, &t);
        }
    }

    #[tokio::test]
    async fn serves_udp_and_tcp() {
        assert!(matches!(
            Responder::bind("0.0.0.0:53".parse().expect("addr")).await,
            Err(DnsError::Unspecified(_))
        ));
        let responder = Responder::bind((Ipv4Addr::LOCALHOST, 0).into())
            .await
            .expect("bind");
        let addr = responder.local_addr();
        assert_ne!(addr.port(), 0);
        // The port is now taken for a second responder on the same address.
        let err = Responder::bind(addr).await.expect_err("port taken");
        assert!(
            err.to_string().contains("is taken"),
            "unexpected error: {err}"
        );

        let (_table_tx, table_rx) = watch::channel(Arc::new(table()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = Arc::new(DnsStats::default());
        let task = tokio::spawn(responder.run(table_rx, Arc::clone(&stats), stop_rx));

        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("client");
        let q = query("node-b.prod.mesh.", RecordType::A)
            .to_vec()
            .expect("encode");
        client.send_to(&q, addr).await.expect("send");
        let mut buf = [0u8; 1500];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("UDP reply in time")
            .expect("recv");
        let msg = Message::from_vec(&buf[..len]).expect("decode");
        assert_eq!(a_records(&msg), vec![v4(2)]);

        let mut stream = TcpStream::connect(addr).await.expect("connect");
        for name in ["node-a.", "all."] {
            let q = query(name, RecordType::A).to_vec().expect("encode");
            let len = u16::try_from(q.len()).expect("len");
            stream.write_all(&len.to_be_bytes()).await.expect("write");
            stream.write_all(&q).await.expect("write");
            let len = tokio::time::timeout(Duration::from_secs(5), stream.read_u16())
                .await
                .expect("TCP reply in time")
                .expect("read");
            let mut reply = vec![0u8; usize::from(len)];
            stream.read_exact(&mut reply).await.expect("read");
            let msg = Message::from_vec(&reply).expect("decode");
            if name == "node-a." {
                assert_eq!(a_records(&msg), vec![v4(1)]);
            } else {
                assert_eq!(msg.response_code(), ResponseCode::Refused);
            }
        }

        stop_tx.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("no panic");
        assert_eq!(stats.snapshot().queries, 3);
    }
}
