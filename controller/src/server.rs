//! The tokio/quinn driver: accepts node connections, runs the Noise channel, applies join/hello
//! to the store, and pushes peer-list deltas through the hub.
//!
//! Limits that keep one node (or a stranger) from costing the controller much:
//! - QUIC: the transport limits and connection cap of [`mesh_control::quic`]; at most
//!   [`mesh_control::channel::MAX_UNADMITTED_LEN`] bytes per message before admission.
//! - One connection per node key: a node that connects again replaces its older connection,
//!   which is closed ([`quic::CLOSE_REPLACED`]).
//! - Heartbeats: a burst of [`HEARTBEAT_BURST`], then one per second ([`HeartbeatLimiter`]);
//!   more are dropped and counted, and a flood closes the connection. The database is written
//!   only when what the node reports changed; `last_seen` every [`LAST_SEEN_EVERY`], for all
//!   connected nodes in one transaction of the replica loop (one commit per node would be a
//!   change every hub, this one's and the other replicas', reads the network for).
//!   Peers get a delta only when their view changed.
//!
//! The database is never called from a tokio task: the connections share one [`Db`] (a store
//! on its own thread), the hub reads through another. The hub notices changes by polling
//! SQLite's `data_version` every 100 ms; a change costs one read of each network with
//! connected nodes and a comparison of its rows with the last read, and each session is then
//! sent the peers that changed, as it sees them. The hub holds one copy of each network's
//! rows with the order of their latest changes ([`netmap::Rows`]), not a view per session: a
//! new node is welcomed from those rows, and a node that reads slowly is a position in that
//! order plus at most `PUSH_QUEUE` messages, so memory grows with the nodes, not with
//! nodes × peers.

use crate::db::Db;
use crate::netmap::{self, PeerMap};
use crate::state::{unix_now, StateDir};
use crate::store::replicas::ReplicaRow;
use crate::store::{
    Admission, Candidates, JoinRequest, NameRequest, NodeReport, RelayRow, RequestOutcome,
    RequestState, StoreError,
};
use anyhow::Context as _;
use mesh_control::quic::{Gate, ServerLimits, Slot};
use mesh_control::{channel, quic, tcp, Link};
use mesh_proto::control::IpNet;
use mesh_proto::control::{
    decode_client, ClientMsg, ErrorCode, RelayInfo, Revocation, ServerMsg, MAX_MESSAGE_LEN,
    MAX_REVOCATIONS,
};
use mesh_proto::PublicKey;
use mesh_relay::forward::CLOSE_REVOKED;
use mesh_relay::{Forwarder, TicketKey};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// How often the hub looks for changes made by other connections or processes.
const POLL: Duration = Duration::from_millis(100);
/// The route states, names, settings and relay lists that could not be queued are retried this
/// often (peers are refilled as the queue drains), and tickets renewed, from what the hub last
/// read: the database is read again only when it changed (or registrations came).
const RESYNC: Duration = Duration::from_secs(2);
/// The database is read in full at least this often even when it says nothing changed: a
/// safety net, and what drops expired revocations from the relay lists. (Each replica writes
/// its own row every few seconds, which counts as a change, so in practice reads come more
/// often.)
const REREAD: Duration = Duration::from_secs(60);
/// Most peers in one `PeersChanged` the hub sends (about 300 bytes each: well within
/// `MAX_MESSAGE_LEN` and `MAX_PEERS`, and small enough that a queue of them per session is
/// little memory at 5,000 sessions).
const DELTA_CHUNK: usize = 128;
/// Messages the hub queues to one session beyond the one being written. A node that reads
/// slowly holds at most these and the QUIC send buffer of the controller's memory: what it
/// was not told waits as a position in the network's order of changes, and the hub refills
/// the queue each time the session wrote a `PeersChanged`.
const PUSH_QUEUE: usize = 2;
/// Most peers a welcome carries itself; the rest follow it in `PeersChanged` messages of
/// [`DELTA_CHUNK`] ([`mesh_proto::control::Welcome::more_peers`]). About 600 KB: within
/// `MAX_MESSAGE_LEN` and `MAX_PEERS`.
const WELCOME_PEERS: usize = 2048;

/// Time a node has to complete the handshake and send its first message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a relay ticket admits a node. While the node is connected here, the hub sends it
/// fresh tickets every [`TICKET_RENEW`]; a node cut off from the controller keeps its relays for
/// the rest of the lifetime.
const TICKET_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Tickets are renewed when they are this old.
const TICKET_RENEW: Duration = Duration::from_secs(6 * 3600);
/// Added to a revocation's expiry: a ticket made while the removal was being noticed (a
/// welcome or a push already under way) expires a little after the removal plus the lifetime.
const REVOCATION_MARGIN: u64 = 5;

/// Heartbeats a node may send back to back (it sends one every 10 s, plus one when its home
/// relay changes).
pub const HEARTBEAT_BURST: f64 = 5.0;
/// Heartbeats per second a node may keep sending after the burst.
pub const HEARTBEAT_RATE: f64 = 1.0;
/// Dropped heartbeats within one minute that close the connection as abusive.
pub const HEARTBEAT_ABUSE: u32 = 3000;
/// `last_seen` is written at least this often while nothing else changes (the online window
/// is 30 s and heartbeats come every 10 s).
pub const LAST_SEEN_EVERY: Duration = Duration::from_secs(15);

/// Counters of the control plane since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Heartbeats accepted.
    pub heartbeats: AtomicU64,
    /// Heartbeats over the rate limit, dropped.
    pub heartbeats_dropped: AtomicU64,
    /// Database writes for heartbeats.
    pub heartbeat_writes: AtomicU64,
    /// Reported endpoint candidates refused (overlay, loopback, unspecified, multicast,
    /// broadcast, port 0).
    pub candidates_refused: AtomicU64,
    /// Connections closed because the same node key connected again.
    pub replaced: AtomicU64,
    /// Peer-list deltas pushed.
    pub deltas_pushed: AtomicU64,
    /// Join requests by network id received.
    pub join_requests: AtomicU64,
    /// Join requests refused at once: their source address asked too often.
    pub join_requests_limited: AtomicU64,
    /// Pending join requests dropped to keep the caps.
    pub join_requests_dropped: AtomicU64,
    /// Nodes connected now that wait for approval.
    pub waiting: AtomicU64,
}

/// Join requests one source address may make back to back.
pub const ASK_BURST: f64 = 50.0;
/// Join requests per second one source address may keep making after the burst.
pub const ASK_RATE: f64 = 10.0;
/// Source addresses the join request limiter remembers; when full, the quietest are forgotten.
const ASK_SOURCES: usize = 4096;

/// Per source address: a burst of join requests, then [`ASK_RATE`] per second. Bounded in
/// memory whatever the number of addresses. An IPv6 source counts by its /64: one host
/// usually holds a whole /64 and could otherwise take a fresh address per request.
#[derive(Debug, Default)]
pub struct AskLimiter {
    sources: HashMap<std::net::IpAddr, (f64, Instant)>,
}

impl AskLimiter {
    /// Whether a join request from `ip` at `now` may be handled.
    pub fn allow(&mut self, ip: std::net::IpAddr, now: Instant) -> bool {
        let ip = match ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                std::net::IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())
            }
            v4 => v4,
        };
        if self.sources.len() >= ASK_SOURCES && !self.sources.contains_key(&ip) {
            // Forget the addresses whose buckets are full again: they cost nothing to rebuild.
            let full_after = Duration::from_secs_f64(ASK_BURST / ASK_RATE);
            self.sources
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < full_after);
            if self.sources.len() >= ASK_SOURCES {
                return false;
            }
        }
        let (tokens, last) = self.sources.entry(ip).or_insert((ASK_BURST, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *last = now;
        *tokens = (*tokens + elapsed * ASK_RATE).min(ASK_BURST);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Stats {
    fn inc(c: &AtomicU64, by: u64) {
        c.fetch_add(by, Ordering::Relaxed);
    }
}

/// Per session: admits a burst of heartbeats, then [`HEARTBEAT_RATE`] per second.
#[derive(Debug, Clone)]
pub struct HeartbeatLimiter {
    tokens: f64,
    last: Instant,
    window_start: Instant,
    dropped_in_window: u32,
}

/// What to do with one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it.
    Accept,
    /// Over the rate: drop and count it.
    Drop,
    /// A flood: close the connection.
    Abuse,
}

impl HeartbeatLimiter {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> Self {
        HeartbeatLimiter {
            tokens: HEARTBEAT_BURST,
            last: now,
            window_start: now,
            dropped_in_window: 0,
        }
    }

    /// Judges a heartbeat that arrived at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * HEARTBEAT_RATE).min(HEARTBEAT_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Accept;
        }
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(60) {
            self.window_start = now;
            self.dropped_in_window = 0;
        }
        self.dropped_in_window += 1;
        if self.dropped_in_window > HEARTBEAT_ABUSE {
            Verdict::Abuse
        } else {
            Verdict::Drop
        }
    }
}

/// The connection currently serving a node key.
struct Current {
    id: u64,
    conn: Link,
}

struct Ctx {
    secret: [u8; 32],
    /// The embedded relay: connected nodes, by network and key.
    forwarder: Arc<Forwarder>,
    /// The database, for the connections' reads and writes (the hub has its own).
    db: Db,
    hub: mpsc::UnboundedSender<HubCmd>,
    next_id: AtomicU64,
    /// One connection per node key.
    current: Mutex<HashMap<(i64, PublicKey), Current>>,
    stats: Arc<Stats>,
    /// Where the STUN observer answers (told to nodes in the Welcome), if it runs.
    observer: Option<SocketAddr>,
    /// The addresses the controller announces in every Welcome: `serve --announce`'s, then
    /// those of the other replicas on its database that are up.
    announce: std::sync::RwLock<Vec<String>>,
    /// `serve --announce`'s alone.
    announce_own: std::sync::RwLock<Vec<String>>,
    /// Join requests per source address.
    asks: Mutex<AskLimiter>,
    /// This controller as the other replicas on its database see it (its row is written every
    /// few seconds; see `store::replicas`).
    replica: Mutex<ReplicaRow>,
    /// Wakes the replica loop to write the row at once (its addresses are known).
    replica_changed: tokio::sync::Notify,
    /// Connections whose node's `last_seen` is due (network, key, session), by connection id:
    /// the replica loop writes them together ([`crate::store::Store::still_connected`]).
    seen: Mutex<HashMap<u64, (i64, PublicKey, String)>>,
}

/// How often a controller writes its replica row and releases the nodes of replicas gone.
const REPLICA_EVERY: Duration = Duration::from_secs(5);

/// A name for this `serve` process, unique among the replicas of a database: host, process
/// and a random part (a restarted process on the same host is another replica).
fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace('/', "-"))
        .unwrap_or_default();
    let host = if host.is_empty() {
        "controller".to_owned()
    } else {
        host
    };
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Keeps this replica's row fresh, and marks disconnected the nodes whose connections
/// belonged to replicas that are gone (killed, or this one's earlier run).
/// Its database connection is its own: a queue of node writes must not make the other
/// replicas think this one is gone.
async fn replica_loop(ctx: Arc<Ctx>, db: Db) {
    let mut tick = tokio::time::interval(REPLICA_EVERY);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.replica_changed.notified() => {}
        }
        let mut row = ctx
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        row.last_seen = unix_now();
        let id = row.id.clone();
        let seen: Vec<(i64, PublicKey, String)> =
            std::mem::take(&mut *ctx.seen.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        let r = db
            .run(move |s| {
                s.still_connected(&seen, unix_now())?;
                s.replica_alive(&row)?;
                let replicas = s.replicas(unix_now())?;
                let live: Vec<String> = replicas.iter().map(|r| r.id.clone()).collect();
                Ok((s.release_sessions(&live)?, replicas))
            })
            .await;
        match r {
            Ok((released, replicas)) => {
                if failing {
                    info!("the database answers again");
                    failing = false;
                }
                if released > 0 {
                    info!(
                        nodes = released,
                        "nodes of a controller that is gone marked disconnected"
                    );
                }
                // Nodes learn the other replicas from every Welcome, and try them when the
                // one they use stops answering.
                let mut announce = ctx
                    .announce_own
                    .read()
                    .map(|a| a.clone())
                    .unwrap_or_default();
                for a in replicas
                    .iter()
                    .filter(|r| r.id != id)
                    .flat_map(|r| &r.addrs)
                {
                    if !announce.contains(a)
                        && announce.len() < mesh_proto::control::MAX_CONTROLLERS
                    {
                        announce.push(a.clone());
                    }
                }
                if let Ok(mut a) = ctx.announce.write() {
                    *a = announce;
                }
            }
            Err(e) if !failing => {
                warn!(error = %e, "cannot reach the database; retrying every 5 s");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

enum HubCmd {
    Register {
        id: u64,
        network_id: i64,
        network: String,
        key: PublicKey,
        tx: mpsc::Sender<ServerMsg>,
        /// Gets the rows the node is welcomed from; it is told the changes after them.
        rows: tokio::sync::oneshot::Sender<Arc<PeerMap>>,
        /// The observed address the node is welcomed as seen from.
        seen_from: Option<SocketAddr>,
        relays: Vec<RelayRow>,
        revoked: Vec<(PublicKey, u64)>,
        birthday_budget: Option<u16>,
    },
    Unregister {
        id: u64,
    },
    /// The session wrote a `PeersChanged` to its node: room in its queue for the next.
    Sent {
        id: u64,
    },
    /// A connection that waits for the administrator's verdict on its join request.
    Wait {
        id: u64,
        network_id: i64,
        key: PublicKey,
        verdict: tokio::sync::oneshot::Sender<RequestState>,
    },
    /// It stopped waiting (the node went away).
    Unwait {
        id: u64,
    },
}

/// A bound controller, ready to run.
pub struct Controller {
    endpoint: quinn::Endpoint,
    tcp: Option<tcp::Listener>,
    ctx: Arc<Ctx>,
    gate: Arc<Gate>,
}

impl Controller {
    /// Opens the state directory's database and binds `listen`. Must be called inside a tokio
    /// runtime (it starts the hub).
    pub fn bind(
        state: &StateDir,
        listen: SocketAddr,
        limits: ServerLimits,
    ) -> anyhow::Result<Controller> {
        Self::bind_with_observer(state, listen, None, limits)
    }

    /// [`Controller::bind`], plus the STUN observer on `observer` (see [`observe`]). An
    /// observer that cannot bind is logged and left off: nodes then cannot tell
    /// endpoint-independent from endpoint-dependent NATs, and punch as if dependent.
    pub fn bind_with_observer(
        state: &StateDir,
        listen: SocketAddr,
        observer: Option<SocketAddr>,
        limits: ServerLimits,
    ) -> anyhow::Result<Controller> {
        let bind = |addr| mesh_control::net::with_ipv4_fallback(addr, mesh_control::net::bind_udp);
        let observer = observer.and_then(|addr| match bind(addr)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(s)
            }) {
            Ok(socket) => {
                let bound = socket.local_addr().unwrap_or(addr);
                info!(%bound, "STUN observer listening (nodes learn their NAT kind from it)");
                tokio::spawn(observe(socket));
                Some(bound)
            }
            Err(e) => {
                warn!(%addr, error = %e, "cannot bind the STUN observer; nodes will not learn their NAT kind (use --observer-listen to pick another address)");
                None
            }
        });
        let secret = state.controller_key()?;
        let now = unix_now();
        let replica = ReplicaRow {
            id: replica_id(),
            addrs: Vec::new(),
            tcp: None,
            started_at: now,
            last_seen: now,
        };
        // The replica loop's first round (at once) writes this replica's row and marks the
        // nodes of replicas gone, this one's earlier run included, disconnected.
        let store = crate::db::blocking(|| -> anyhow::Result<_> {
            let store = state.open_store()?;
            store.claim_identity(&crate::state::public_of(&secret))?;
            Ok(store)
        })?;
        let endpoint = quic::bind_server(listen, &secret)?;
        let (hub_tx, hub_rx) = mpsc::unbounded_channel();
        let hub_db = Db::start(crate::db::blocking(|| state.open_store())?, "mesh-db-hub")?;
        let forwarder = Forwarder::new();
        let stats = Arc::new(Stats::default());
        tokio::spawn(run_hub(
            hub_db,
            hub_rx,
            secret,
            forwarder.clone(),
            stats.clone(),
        ));
        let ctx = Arc::new(Ctx {
            secret,
            forwarder,
            db: Db::start(store, "mesh-db")?,
            hub: hub_tx,
            next_id: AtomicU64::new(1),
            current: Mutex::new(HashMap::new()),
            stats,
            observer,
            announce: std::sync::RwLock::new(Vec::new()),
            announce_own: std::sync::RwLock::new(Vec::new()),
            asks: Mutex::new(AskLimiter::default()),
            replica: Mutex::new(replica),
            replica_changed: tokio::sync::Notify::new(),
            seen: Mutex::new(HashMap::new()),
        });
        tokio::spawn(replica_loop(
            ctx.clone(),
            Db::start(
                crate::db::blocking(|| state.open_store())?,
                "mesh-db-replica",
            )?,
        ));
        Ok(Controller {
            endpoint,
            tcp: None,
            ctx,
            gate: Gate::new(limits),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Also listens on TCP at `listen` (TLS after an HTTP upgrade: join, control and the
    /// embedded relay for nodes whose UDP is blocked). Returns the address bound.
    /// Announces `addrs` (`host:port` of the QUIC listener) to every node that connects from
    /// now on: nodes save them and try them when the address they use stops answering, so a
    /// controller about to move announces its new address first.
    pub fn announce(&self, addrs: Vec<String>) {
        if let Ok(mut a) = self.ctx.announce_own.write() {
            a.clone_from(&addrs);
        }
        if let Ok(mut a) = self.ctx.announce.write() {
            *a = addrs;
        }
    }

    /// Where nodes reach this controller, for the replica row the others and admin commands
    /// read (`token create` puts the replicas that are up into tokens).
    pub fn set_addresses(&self, addrs: Vec<String>, tcp: Option<String>) {
        {
            let mut row = self.ctx.replica.lock().unwrap_or_else(|p| p.into_inner());
            row.addrs = addrs;
            row.tcp = tcp;
        }
        // Admin commands on other hosts put these addresses into tokens from now on.
        self.ctx.replica_changed.notify_one();
    }

    /// This controller's replica id (in its logs and the database's `controllers` table).
    pub fn replica_id(&self) -> String {
        self.ctx
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone()
    }

    pub fn listen_tcp(&mut self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tcp::Listener::bind(listen)?;
        let bound = listener.local_addr()?;
        self.tcp = Some(listener);
        Ok(bound)
    }

    /// The embedded relay's table.
    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.ctx.forwarder.clone()
    }

    /// Control-plane counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.ctx.stats.clone()
    }

    /// Connection counters.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Rows the serving connection changed in the database since start.
    pub fn store_changes(&self) -> u64 {
        self.ctx.db.changes()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let Some((incoming, slot)) = self.gate.admit(incoming) else { continue };
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        let r = async { handle(Link::Quic(incoming.await?), slot, ctx).await };
                        if let Err(e) = r.await {
                            debug!(%remote, error = %format!("{e:#}"), "connection ended");
                        }
                    }.instrument(tracing::info_span!("node", %remote, transport = "quic")));
                }
                attempt = mesh_relay::server::accept_tcp(self.tcp.as_ref(), &self.gate) => {
                    let Some(attempt) = attempt else { continue };
                    let (remote, ctx) = (attempt.remote, self.ctx.clone());
                    tokio::spawn(async move {
                        let r = async {
                            let (link, slot) = attempt.upgrade().await?;
                            handle(link, slot, ctx).await
                        };
                        if let Err(e) = r.await {
                            debug!(%remote, error = %format!("{e:#}"), "connection ended");
                        }
                    }.instrument(tracing::info_span!("node", %remote, transport = "tcp")));
                }
                _ = &mut shutdown => break,
            }
        }
        info!("shutting down");
        let id = self.replica_id();
        let _ = self
            .ctx
            .db
            .run(move |s| s.replica_gone(&id, unix_now()))
            .await;
        self.endpoint
            .close(0u32.into(), b"controller shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The STUN observer: answers every binding request with the address it came from. A node asks
/// from its one UDP socket; the answer, beside the address the QUIC side sees, tells it whether
/// its NAT maps per destination. Requests shorter than the answer get none (see
/// `mesh_proto::stun`), so the observer amplifies nothing.
async fn observe(socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; mesh_proto::stun::MAX_LEN + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "STUN observer receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Some(id) = mesh_proto::stun::parse_request(&buf[..n]) {
            let _ = socket
                .send_to(
                    &mesh_proto::stun::answer(id, mesh_control::net::canonical(from)),
                    from,
                )
                .await;
        }
    }
}

/// Whether and where a controller or relay listens on TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpListen {
    /// Not at all.
    Off,
    /// The default (port 443): left off, with a warning, if it cannot be bound (another web
    /// server holds it, or the service lacks CAP_NET_BIND_SERVICE).
    Default(SocketAddr),
    /// Where the operator said: failing to bind it is an error.
    Explicit(SocketAddr),
}

impl TcpListen {
    /// Binds with `bind` as the rule says; `Ok(None)` when off or a default that cannot be had.
    pub fn bind<T>(
        self,
        what: &str,
        bind: impl FnOnce(SocketAddr) -> std::io::Result<T>,
    ) -> anyhow::Result<Option<T>> {
        match self {
            TcpListen::Off => Ok(None),
            TcpListen::Default(addr) => match bind(addr) {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    warn!(%addr, error = %e, "cannot listen on TCP; nodes whose UDP is blocked cannot reach this {what} (run it with CAP_NET_BIND_SERVICE as the shipped unit does, or pick a port with --listen-tcp, or --listen-tcp off to silence this)");
                    Ok(None)
                }
            },
            TcpListen::Explicit(addr) => bind(addr)
                .map(Some)
                .with_context(|| format!("cannot listen on TCP {addr}")),
        }
    }
}

/// Runs the controller until SIGINT/SIGTERM, with the default connection limits.
pub async fn serve(
    state: StateDir,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    serve_with(
        state,
        listen,
        TcpListen::Off,
        metrics_listen,
        None,
        ServerLimits::default(),
        Vec::new(),
    )
    .await
}

/// [`serve`] with explicit connection limits.
pub async fn serve_with(
    state: StateDir,
    listen: SocketAddr,
    listen_tcp: TcpListen,
    metrics_listen: Option<SocketAddr>,
    observer: Option<SocketAddr>,
    limits: ServerLimits,
    announce: Vec<String>,
) -> anyhow::Result<()> {
    let mut controller = Controller::bind_with_observer(&state, listen, observer, limits)?;
    if !announce.is_empty() {
        info!(addresses = ?announce, "announcing these controller addresses to every node");
        controller.announce(announce.clone());
    }
    let tcp = listen_tcp.bind("controller", |a| controller.listen_tcp(a))?;
    if let Some(tcp) = tcp {
        info!(%tcp, "listening on TCP too (TLS, for nodes whose UDP is blocked)");
    }
    // The bound addresses: with port 0 the kernel chose one, and tokens must carry it. The UDP
    // address last: `token create` takes it as the sign that both are written.
    state.write_listen_tcp_addr(tcp)?;
    let bound = controller.local_addr().unwrap_or(listen);
    state.write_listen_addr(bound)?;
    // Where nodes reach this replica, for tokens made on any host of a shared database.
    let mut addrs: Vec<String> = Vec::new();
    if !bound.ip().is_unspecified() {
        addrs.push(bound.to_string());
    }
    for a in &announce {
        if !addrs.contains(a) {
            addrs.push(a.clone());
        }
    }
    let tcp_addr = tcp.and_then(|t| {
        let host = addrs.first()?.rsplit_once(':')?.0;
        Some(format!("{host}:{}", t.port()))
    });
    controller.set_addresses(addrs, tcp_addr);
    if let Some(addr) = metrics_listen {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let store = crate::db::blocking(|| state.open_store())?;
        let forwarder = controller.forwarder();
        let control = Some((controller.stats(), controller.gate()));
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_with(addr, Some(store), forwarder, control).await
            {
                warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    info!(%listen, key = %state.controller_public()?, replica = %controller.replica_id(), database = %state.database_name(), max_connections = limits.max_connections, "controller listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    controller
        .run(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await;
    Ok(())
}

fn current(ctx: &Ctx) -> std::sync::MutexGuard<'_, HashMap<(i64, PublicKey), Current>> {
    ctx.current.lock().unwrap_or_else(|p| p.into_inner())
}

/// Revocation cut-offs for the nodes of a network removed within a ticket lifetime: (key,
/// latest expiry of a ticket issued before the removal), newest first.
fn revoked_in(
    store: &crate::store::Store,
    network_id: i64,
    now: u64,
) -> Result<Vec<(PublicKey, u64)>, StoreError> {
    let lifetime = TICKET_LIFETIME.as_secs() + REVOCATION_MARGIN;
    Ok(store
        .removed_since(network_id, now.saturating_sub(lifetime), MAX_REVOCATIONS)?
        .into_iter()
        .map(|(key, at)| (key, at + lifetime))
        .collect())
}

/// The standalone relays with a ticket for `key` in `network` at each, and the network's
/// revocations made for each relay.
fn relay_infos(
    secret: &[u8; 32],
    relays: &[RelayRow],
    network: &str,
    key: &PublicKey,
    revoked: &[(PublicKey, u64)],
) -> Vec<RelayInfo> {
    let expires = unix_now() + TICKET_LIFETIME.as_secs();
    relays
        .iter()
        .map(|r| {
            let tickets = TicketKey::new(secret, &r.key);
            RelayInfo {
                name: r.name.clone(),
                addr: r.addr.clone(),
                tcp: r.tcp_addr.clone(),
                key: r.key,
                ticket: tickets.issue(network, key, expires),
                revoked: revocations_for(&tickets, network, revoked),
            }
        })
        .collect()
}

fn revocations_for(
    tickets: &TicketKey,
    network: &str,
    revoked: &[(PublicKey, u64)],
) -> Vec<Revocation> {
    revoked
        .iter()
        .take(MAX_REVOCATIONS)
        .map(|(k, cutoff)| tickets.revoke(network, k, *cutoff))
        .collect()
}

async fn refuse(tx: &mut channel::Sender, conn: &Link, code: ErrorCode, message: String) {
    info!(?code, %message, "refused");
    let _ = tx.send(&ServerMsg::Error { code, message }.encode()).await;
    tx.finish();
    // Let the node read the error before the connection goes away.
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
}

/// A join request by network id: admitted at once (a member already, or a network that
/// approves automatically), or recorded, answered `Pending`, and held until the administrator
/// decides. `None`: the node went away while it waited.
#[allow(clippy::too_many_arguments)]
async fn ask(
    ctx: &Arc<Ctx>,
    conn: &Link,
    tx: &mut channel::Sender,
    rx: &mut channel::Receiver,
    network: &str,
    key: &PublicKey,
    name: NameRequest<'_>,
    hostname: &str,
    seen: Candidates<'_>,
) -> Option<Result<Admission, StoreError>> {
    Stats::inc(&ctx.stats.join_requests, 1);
    let source = conn.remote_address().ip();
    let allowed = ctx
        .asks
        .lock()
        .map(|mut a| a.allow(source, Instant::now()))
        .unwrap_or(false);
    if !allowed {
        Stats::inc(&ctx.stats.join_requests_limited, 1);
        return Some(Err(StoreError::Refused {
            code: ErrorCode::RequestDropped,
            message: format!("too many join requests from {source}; ask again in a minute"),
        }));
    }
    // The write waits for the database (and its fsync), on the database's thread.
    let outcome = {
        let (network, key, hostname) = (network.to_owned(), *key, hostname.to_owned());
        let (exact, name) = match name {
            NameRequest::Exact(n) => (true, n.to_owned()),
            NameRequest::Preferred(n) => (false, n.to_owned()),
        };
        let (reported, observed) = (seen.reported.to_vec(), seen.observed);
        ctx.db
            .run(move |store| {
                let request = JoinRequest {
                    network: &network,
                    key: &key,
                    name: if exact {
                        NameRequest::Exact(&name)
                    } else {
                        NameRequest::Preferred(&name)
                    },
                    hostname: &hostname,
                    // Over TCP the source is the node's too (a proxy's, behind one).
                    source: Some(source),
                    seen: Candidates {
                        reported: &reported,
                        observed,
                    },
                };
                store.request_join(&request, unix_now())
            })
            .await
    };
    let (network_id, recorded) = match outcome {
        Ok(RequestOutcome::Admitted(adm)) => return Some(Ok(adm)),
        Ok(RequestOutcome::Pending {
            network_id,
            name,
            dropped,
        }) => {
            Stats::inc(&ctx.stats.join_requests_dropped, dropped as u64);
            (network_id, name)
        }
        Err(e) => return Some(Err(e)),
    };
    info!(network, name = %recorded, fingerprint = %key.fingerprint(), %source, "join request waits for approval");
    let sent = tx
        .send(
            &ServerMsg::Pending {
                network: network.to_owned(),
                name: recorded.clone(),
            }
            .encode(),
        )
        .await;
    if sent.is_err() {
        return None;
    }
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel();
    let _ = ctx.hub.send(HubCmd::Wait {
        id,
        network_id,
        key: *key,
        verdict: verdict_tx,
    });
    ctx.stats.waiting.fetch_add(1, Ordering::Relaxed);
    let verdict = async {
        tokio::pin!(verdict_rx);
        loop {
            tokio::select! {
                v = &mut verdict_rx => return v.ok(),
                // A waiting node has nothing to say; whatever it sends is dropped, and a closed
                // connection ends the wait.
                m = rx.recv() => if m.is_err() { return None },
            }
        }
    }
    .await;
    ctx.stats.waiting.fetch_sub(1, Ordering::Relaxed);
    let _ = ctx.hub.send(HubCmd::Unwait { id });
    match verdict? {
        RequestState::Approved => {
            info!(network, name = %recorded, "join request approved; admitting the waiting node");
            let (network, key) = (network.to_owned(), *key);
            let (reported, observed) = (seen.reported.to_vec(), seen.observed);
            Some(
                ctx.db
                    .run(move |store| {
                        let seen = Candidates {
                            reported: &reported,
                            observed,
                        };
                        store.hello(&network, &key, seen, unix_now())
                    })
                    .await,
            )
        }
        RequestState::Rejected { at, by } => {
            info!(network, name = %recorded, %by, "join request rejected; telling the waiting node");
            Some(Err(StoreError::Refused {
                code: ErrorCode::Rejected,
                message: crate::store::approval::rejection_message(network, at),
            }))
        }
        RequestState::Gone | RequestState::Pending => Some(Err(StoreError::Refused {
            code: ErrorCode::RequestDropped,
            message: "the request lapsed or was pushed out by newer ones (the controller keeps a bounded number); asking again".into(),
        })),
    }
}

async fn handle(conn: Link, mut slot: Slot, ctx: Arc<Ctx>) -> anyhow::Result<()> {
    // Everything before admission is bounded in time and size (the channel reads at most
    // MAX_UNADMITTED_LEN bytes per message until the limit is raised below).
    let (mut tx, mut rx, key, first) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (tx, mut rx, key) = channel::accept(&conn, &ctx.secret).await?;
        let first = rx.recv().await.map(|b| decode_client(&b));
        anyhow::Ok((tx, rx, key, first))
    })
    .await
    .context("handshake timed out")??;
    // The node's UDP mapping as seen here; none over TCP, whose source port is no candidate.
    let observed = conn.observed_udp();
    let transport = conn.transport();
    let now = unix_now();
    let mut home = None;
    let mut hello_nat = None;
    // The prefixes a returning node advertises (a hello carries the whole list; none is a list).
    let mut hello_routes: Option<(Vec<IpNet>, Vec<IpNet>)> = None;
    let result: Result<Admission, StoreError> = match first {
        Ok(Ok(ClientMsg::Join {
            token_id,
            token_secret,
            name,
            endpoints,
            exact_name,
        })) => match mesh_proto::hex::decode(&token_secret) {
            Some(secret) => {
                ctx.db
                    .run(move |store| {
                        store.join(
                            &token_id,
                            &secret,
                            &key,
                            if exact_name {
                                NameRequest::Exact(&name)
                            } else {
                                NameRequest::Preferred(&name)
                            },
                            Candidates {
                                reported: &endpoints,
                                observed,
                            },
                            now,
                        )
                    })
                    .await
            }
            None => Err(StoreError::Refused {
                code: ErrorCode::TokenInvalid,
                message: "join token secret is not hex".into(),
            }),
        },
        Ok(Ok(ClientMsg::RequestJoin {
            network,
            name,
            hostname,
            endpoints,
            exact_name,
        })) => {
            let name = if exact_name {
                NameRequest::Exact(&name)
            } else {
                NameRequest::Preferred(&name)
            };
            let seen = Candidates {
                reported: &endpoints,
                observed,
            };
            // The node proved its key: a wait for approval is no handshake in flight.
            slot.established();
            match ask(
                &ctx, &conn, &mut tx, &mut rx, &network, &key, name, &hostname, seen,
            )
            .await
            {
                Some(r) => r,
                None => return Ok(()),
            }
        }
        Ok(Ok(ClientMsg::Hello {
            network,
            endpoints,
            home_relay,
            nat,
            routes,
            exits,
        })) => {
            home = home_relay.clone();
            hello_nat = nat;
            hello_routes = Some((routes, exits));
            ctx.db
                .run(move |store| {
                    let seen = Candidates {
                        reported: &endpoints,
                        observed,
                    };
                    let adm = store.hello(&network, &key, seen, now)?;
                    store.set_home_relay(adm.network_id, &key, home_relay.as_deref())?;
                    Ok(adm)
                })
                .await
        }
        Ok(Ok(_)) => Err(StoreError::Refused {
            code: ErrorCode::BadRequest,
            message: "the first message must be join or hello".into(),
        }),
        Ok(Err(e)) => Err(StoreError::Refused {
            code: ErrorCode::BadRequest,
            message: format!("malformed message: {e}"),
        }),
        Err(channel::ChannelError::Closed) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let adm = match result {
        Ok(a) => a,
        Err(StoreError::Refused { code, message }) => {
            refuse(&mut tx, &conn, code, message).await;
            return Ok(());
        }
        Err(e) => {
            warn!(error = %e, "store failure");
            refuse(
                &mut tx,
                &conn,
                ErrorCode::Internal,
                "the controller failed to handle the request; see its log".into(),
            )
            .await;
            return Err(e.into());
        }
    };
    slot.established();
    rx.set_limit(MAX_MESSAGE_LEN);
    if adm.refused > 0 {
        Stats::inc(&ctx.stats.candidates_refused, adm.refused as u64);
        debug!(refused = adm.refused, "reported candidates refused (overlay, loopback, unspecified, multicast, broadcast or port 0)");
    }
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    // One connection per node key: this one replaces an older one.
    let older = current(&ctx).insert(
        (adm.network_id, key),
        Current {
            id,
            conn: conn.clone(),
        },
    );
    let session = format!(
        "{}/{id}",
        ctx.replica.lock().unwrap_or_else(|p| p.into_inner()).id
    );
    {
        let (network_id, session) = (adm.network_id, session.clone());
        ctx.db
            .run(move |s| s.claim_session(network_id, &key, &session))
            .await?;
    }
    if let Some(older) = older {
        Stats::inc(&ctx.stats.replaced, 1);
        info!(node = %adm.name, "node connected again; closing its older connection");
        older.conn.close(
            quic::CLOSE_REPLACED,
            b"replaced by a newer connection of the same node",
        );
    }
    let network_id = adm.network_id;
    if let Some((routes, exits)) = hello_routes.clone() {
        ctx.db
            .run(move |s| s.advertise(network_id, &key, &routes, &exits, unix_now()))
            .await?;
    }
    let mut advertised = hello_routes.unwrap_or_default();
    info!(node = %adm.name, %key, address = %adm.address, address6 = ?adm.address6, network = %adm.network, observed = ?observed, %transport, "node connected");
    let (relays, revoked, birthday_budget) = ctx
        .db
        .run(move |store| {
            Ok((
                store.relays()?,
                revoked_in(store, network_id, unix_now())?,
                store.birthday_budget(network_id)?,
            ))
        })
        .await?;
    // The peer list comes from the hub's rows (one copy shared by every node being welcomed,
    // not one per node: at 5,000 nodes joining at once those held gigabytes), and the hub
    // then tells the node what changed after them. Its pushes wait in the queue until the
    // welcome is out.
    let (push_tx, mut push_rx) = mpsc::channel(PUSH_QUEUE);
    let (rows_tx, rows_rx) = tokio::sync::oneshot::channel();
    // Seen from where its connection comes from: the hub may not have read its row yet.
    let seen_from = observed
        .and_then(|o| netmap::usable_observed(o, (adm.overlay.network, adm.overlay.prefix_len)));
    let _ = ctx.hub.send(HubCmd::Register {
        id,
        network_id: adm.network_id,
        network: adm.network.clone(),
        key,
        tx: push_tx,
        rows: rows_tx,
        seen_from,
        relays: relays.clone(),
        revoked: revoked.clone(),
        birthday_budget,
    });
    let rows = rows_rx
        .await
        .context("the controller cannot read the network's members")?;
    let (count, mut peers) = netmap::welcome_view(&rows, &key, seen_from);
    let first: Vec<_> = peers.by_ref().take(WELCOME_PEERS).collect();
    let more_peers = (count - first.len()) as u32;
    tx.send(
        &ServerMsg::Welcome(mesh_proto::control::Welcome {
            network: adm.network.clone(),
            name: adm.name.clone(),
            address: adm.address,
            prefix_len: adm.prefix_len,
            address6: adm.address6,
            prefix6: adm.prefix6,
            peers: first,
            relays: relay_infos(&ctx.secret, &relays, &adm.network, &key, &revoked),
            observed,
            observer: ctx.observer,
            birthday_budget,
            controllers: ctx.announce.read().map(|a| a.clone()).unwrap_or_default(),
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_millis()).ok()),
            more_peers,
        })
        .encode(),
    )
    .await?;
    // The rest of a large network's list, before anything the hub pushes.
    loop {
        let upsert: Vec<_> = peers.by_ref().take(DELTA_CHUNK).collect();
        if upsert.is_empty() {
            break;
        }
        let rest = ServerMsg::PeersChanged {
            upsert,
            remove: Vec::new(),
        };
        tx.send(&rest.encode()).await?;
    }
    // Not kept for the connection's life: an old snapshot of the network per node.
    drop(peers);
    drop(rows);
    let relay = tokio::spawn({
        let (forwarder, conn, network) = (ctx.forwarder.clone(), conn.clone(), adm.network.clone());
        async move { forwarder.serve(&network, key, conn).await }
    });
    let overlay = (adm.overlay.network, adm.overlay.prefix_len);
    let mut limiter = HeartbeatLimiter::new(Instant::now());
    let mut reported = NodeReport {
        endpoints: adm.endpoints.clone(),
        observed: observed.and_then(|o| netmap::usable_observed(o, overlay)),
        home_relay: home,
        nat: hello_nat,
    };
    if hello_nat.is_some() {
        let report = reported.clone();
        ctx.db
            .run(move |s| s.heartbeat(network_id, &key, &report, unix_now()))
            .await?;
    }
    let mut written_at = Instant::now();
    let mut left = false;
    let mut removed = false;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg.map(|b| decode_client(&b)) {
                Ok(Ok(ClientMsg::Heartbeat { endpoints, home_relay, nat, routes, exits })) => {
                    match limiter.check(Instant::now()) {
                        Verdict::Accept => {}
                        Verdict::Drop => {
                            Stats::inc(&ctx.stats.heartbeats_dropped, 1);
                            continue;
                        }
                        Verdict::Abuse => {
                            Stats::inc(&ctx.stats.heartbeats_dropped, 1);
                            warn!(node = %adm.name, "heartbeat flood; closing the connection");
                            refuse(&mut tx, &conn, ErrorCode::BadRequest, format!("more than {HEARTBEAT_ABUSE} heartbeats over the limit within a minute; the agent sends one every 10 s")).await;
                            break;
                        }
                    }
                    Stats::inc(&ctx.stats.heartbeats, 1);
                    let observed = conn.observed_udp().and_then(|o| netmap::usable_observed(o, overlay));
                    let (mut endpoints, mut refused) = netmap::filter_reported(&endpoints, observed, overlay);
                    refused += crate::store::ipam6::refuse_overlay6(adm.prefix6, &mut endpoints);
                    if refused > 0 {
                        Stats::inc(&ctx.stats.candidates_refused, refused as u64);
                        debug!(refused, "reported candidates refused");
                    }
                    let now_advertised = (routes, exits);
                    if now_advertised != advertised {
                        let (routes, exits) = now_advertised.clone();
                        ctx.db.run(move |s| s.advertise(network_id, &key, &routes, &exits, unix_now())).await?;
                        info!(node = %adm.name, routes = ?now_advertised.0, exits = ?now_advertised.1, "advertised routes changed");
                        advertised = now_advertised;
                    }
                    let report = NodeReport { endpoints, observed, home_relay, nat };
                    if report != reported {
                        let written = report.clone();
                        ctx.db.run(move |s| s.heartbeat(network_id, &key, &written, unix_now())).await?;
                        Stats::inc(&ctx.stats.heartbeat_writes, 1);
                        reported = report;
                        written_at = Instant::now();
                    } else if written_at.elapsed() >= LAST_SEEN_EVERY {
                        // Written with the others' at the replica loop's next round.
                        ctx.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (network_id, key, session.clone()));
                        written_at = Instant::now();
                    }
                }
                Ok(Ok(ClientMsg::Leave)) => {
                    relay.abort();
                    ctx.forwarder.remove(&adm.network, &key, false);
                    ctx.db.run(move |s| s.leave(network_id, &key, unix_now())).await?;
                    info!(node = %adm.name, "node left the network");
                    left = true;
                    let _ = tx.send(&ServerMsg::Left.encode()).await;
                    tx.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
                    break;
                }
                Ok(Ok(other)) => debug!(?other, "unexpected message ignored"),
                Ok(Err(e)) => {
                    warn!(error = %e, "malformed message; closing");
                    break;
                }
                Err(_) => break,
            },
            out = push_rx.recv() => match out {
                Some(msg) => {
                    let fatal = matches!(msg, ServerMsg::Error { .. });
                    if fatal {
                        // Removed: off the relay at once (the hub took it out of the table),
                        // then the reason, then the connection.
                        relay.abort();
                        removed = true;
                    }
                    let peers = matches!(msg, ServerMsg::PeersChanged { .. });
                    tx.send(&msg.encode()).await?;
                    if peers {
                        let _ = ctx.hub.send(HubCmd::Sent { id });
                    }
                    if fatal {
                        tx.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                        conn.close(CLOSE_REVOKED, b"removed from the network");
                        break;
                    }
                }
                None => break,
            },
        }
    }
    // Dropping the forwarding task takes the node out of the relay table.
    relay.abort();
    let _ = ctx.hub.send(HubCmd::Unregister { id });
    ctx.seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let still_current = {
        let mut cur = current(&ctx);
        let mine = cur.get(&(adm.network_id, key)).is_some_and(|c| c.id == id);
        if mine {
            cur.remove(&(adm.network_id, key));
        }
        mine
    };
    if still_current && !left && !removed {
        ctx.db
            .run(move |s| s.disconnected(network_id, &key, &session, unix_now()))
            .await?;
    }
    info!(node = %adm.name, replaced = !still_current, "node disconnected");
    Ok(())
}

struct Session {
    network_id: i64,
    network: String,
    key: PublicKey,
    tx: mpsc::Sender<ServerMsg>,
    // The hub keeps no view per session (it would hold peers × sessions entries): the node
    // was told the hub's rows as it sees them, except for the changes after `told_upto` and
    // the peers in `owed`.
    /// Position in the network's order of changes ([`netmap::Rows`]) up to which the node
    /// was told every change.
    told_upto: u64,
    /// Peers whose view changed for this node alone (its own observed address moved), not
    /// yet told. Keys only: what it is told is read from the rows when there is room in its
    /// queue.
    owed: BTreeSet<PublicKey>,
    /// The node's observed address as its view was last computed: it decides which of each
    /// peer's candidates the node is told.
    seen_from: Option<SocketAddr>,
    removed: bool,
    /// The relay list last sent, its revocations, and when its tickets were made.
    relays: Vec<RelayRow>,
    revoked: Vec<(PublicKey, u64)>,
    tickets_at: tokio::time::Instant,
    /// The network's birthday budget as last told.
    birthday_budget: Option<u16>,
    /// Where the node's advertised prefixes stand, as last told.
    route_states: Vec<mesh_proto::control::RouteState>,
    /// The network's names for several nodes, as last told.
    names: Vec<mesh_proto::control::NameAlias>,
}

/// Owns the list of connected sessions; pushes deltas when the database changes. Its reads go
/// to a connection of its own (`db`), so that they never wait behind the connections' writes.
async fn run_hub(
    db: Db,
    mut rx: mpsc::UnboundedReceiver<HubCmd>,
    secret: [u8; 32],
    forwarder: Arc<Forwarder>,
    stats: Arc<Stats>,
) {
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut waiters: HashMap<u64, Waiter> = HashMap::new();
    let mut version = db.run(|s| s.data_version()).await.ok();
    let mut poll = tokio::time::interval(POLL);
    let mut last_full = tokio::time::Instant::now();
    let mut last_retry = last_full;
    let mut registered = false;
    let mut hub = Hub {
        secret,
        forwarder,
        stats,
        nets: HashMap::new(),
        last_read: None,
        may_lag: false,
    };
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(HubCmd::Register { id, network_id, network, key, tx, rows, seen_from, relays, revoked, birthday_budget }) => {
                    // The first node of a network: its rows are read now.
                    if !hub.nets.contains_key(&network_id) {
                        hub.read_network(&db, network_id).await;
                    }
                    let Some(net) = hub.nets.get(&network_id) else {
                        // Not read: the connection ends and the node tries again.
                        continue;
                    };
                    let _ = rows.send(net.snapshot());
                    let tickets_at = tokio::time::Instant::now();
                    sessions.insert(id, Session { network_id, network, key, tx, told_upto: net.last(), owed: BTreeSet::new(), seen_from, removed: false, relays, revoked, tickets_at, birthday_budget, route_states: Vec::new(), names: Vec::new() });
                    // Route states and names are told at the next tick.
                    registered = true;
                }
                Some(HubCmd::Unregister { id }) => { sessions.remove(&id); }
                Some(HubCmd::Sent { id }) => hub.catch_up_one(&mut sessions, id),
                Some(HubCmd::Wait { id, network_id, key, verdict }) => {
                    let mut one = HashMap::from([(id, Waiter { network_id, key, verdict })]);
                    // A verdict between the request and now must not be lost.
                    decide(&db, &mut one).await;
                    waiters.extend(one);
                }
                Some(HubCmd::Unwait { id }) => { waiters.remove(&id); }
                None => return,
            },
            _ = poll.tick() => {
                let v = db.run(|s| s.data_version()).await.ok();
                if v != version || registered || last_full.elapsed() >= REREAD {
                    let changed = v != version;
                    version = v;
                    registered = false;
                    last_full = tokio::time::Instant::now();
                    last_retry = last_full;
                    hub.push(&db, &mut sessions).await;
                    if changed || !waiters.is_empty() {
                        decide(&db, &mut waiters).await;
                    }
                } else {
                    if last_retry.elapsed() >= RESYNC {
                        last_retry = tokio::time::Instant::now();
                        hub.tell_states(&mut sessions);
                        if !waiters.is_empty() {
                            decide(&db, &mut waiters).await;
                        }
                    }
                    // Only after a session's queue was found full: a scan of every session ten
                    // times a second was most of an idle hub's work.
                    if hub.may_lag {
                        if hub.lagging(&sessions) {
                            hub.catch_up(&mut sessions);
                        } else {
                            hub.may_lag = false;
                        }
                    }
                }
            }
        }
    }
}

/// A connection waiting for the verdict on its join request.
struct Waiter {
    network_id: i64,
    key: PublicKey,
    verdict: tokio::sync::oneshot::Sender<RequestState>,
}

/// Tells every waiter whose request was decided (approved, rejected, or gone) its verdict.
async fn decide(db: &Db, waiters: &mut HashMap<u64, Waiter>) {
    if waiters.is_empty() {
        return;
    }
    let asked: Vec<(u64, i64, PublicKey)> = waiters
        .iter()
        .map(|(id, w)| (*id, w.network_id, w.key))
        .collect();
    let states = db
        .run(move |store| {
            let now = unix_now();
            asked
                .into_iter()
                .map(|(id, network_id, key)| Ok((id, store.request_state(network_id, &key, now)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await;
    let states = match states {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot read join requests");
            return;
        }
    };
    for (id, state) in states {
        if matches!(state, RequestState::Pending) {
            continue;
        }
        if let Some(w) = waiters.remove(&id) {
            let _ = w.verdict.send(state);
        }
    }
}

/// What the hub reads of one network to bring its sessions up to date.
struct NetworkState {
    /// The members as stored, by key.
    peers: PeerMap,
    birthday_budget: Option<u16>,
    route_states: HashMap<PublicKey, Vec<mesh_proto::control::RouteState>>,
    names: Vec<mesh_proto::control::NameAlias>,
    /// Revocations for the standalone relays (none read when there is no relay).
    revoked: Vec<(PublicKey, u64)>,
}

/// The members of a network by key, as stored.
fn members(store: &crate::store::Store, network_id: i64) -> Result<PeerMap, StoreError> {
    Ok(store
        .peers(network_id)?
        .into_iter()
        .map(|p| (p.key, p))
        .collect())
}

/// The relays, and the state of each of `networks`, in one visit to the database thread.
fn read_networks(
    store: &crate::store::Store,
    networks: &[i64],
) -> Result<(Vec<RelayRow>, HashMap<i64, NetworkState>), StoreError> {
    let relays = store.relays()?;
    let now = unix_now();
    let mut states = HashMap::with_capacity(networks.len());
    for &id in networks {
        let revoked = if relays.is_empty() {
            Vec::new()
        } else {
            revoked_in(store, id, now)?
        };
        states.insert(
            id,
            NetworkState {
                peers: members(store, id)?,
                birthday_budget: store.birthday_budget(id)?,
                route_states: store.route_states(id)?,
                names: store.aliases(id)?,
                revoked,
            },
        );
    }
    Ok((relays, states))
}

struct Hub {
    secret: [u8; 32],
    forwarder: Arc<Forwarder>,
    stats: Arc<Stats>,
    /// Each network's peer rows as the hub last read them, and the order in which they
    /// changed: a push compares the new rows with these once per network, and each session
    /// is then told the peers that changed after its position.
    nets: HashMap<i64, netmap::Rows>,
    /// The relays and the networks' states (without their peers, which are in `nets`) as last
    /// read: the retries between reads are told from these.
    last_read: Option<(Vec<RelayRow>, HashMap<i64, NetworkState>)>,
    /// Whether a session may have peers it was not told yet: set when one is left behind (its
    /// queue was full), cleared when a look finds none.
    may_lag: bool,
}

impl Hub {
    /// Brings every session up to date with the database: peers (a delta of what changed),
    /// route states, names, settings and relay tickets. The work per change is one read of
    /// each network with sessions, one comparison of its rows with the last read, and for each
    /// session the peers that changed: not every session's whole view.
    async fn push(&mut self, db: &Db, sessions: &mut HashMap<u64, Session>) {
        let mut networks: Vec<i64> = sessions
            .values()
            .filter(|s| !s.removed)
            .map(|s| s.network_id)
            .collect();
        networks.sort_unstable();
        networks.dedup();
        // The rows of a network nobody is connected to would go stale: its next node is
        // welcomed from a fresh read instead.
        self.nets.retain(|id, _| networks.binary_search(id).is_ok());
        if networks.is_empty() {
            return;
        }
        let (relays, mut states) = match db.run(move |s| read_networks(s, &networks)).await {
            Ok(read) => read,
            Err(e) => {
                warn!(error = %e, "cannot read the networks' state");
                return;
            }
        };
        for (id, net) in &mut states {
            let rows = std::mem::take(&mut net.peers);
            self.nets.entry(*id).or_default().update(rows);
        }
        self.last_read = Some((relays, states));
        self.tell_states(sessions);
        self.catch_up(sessions);
    }

    /// Tells every session what changed for it in the last read besides peers: removal from
    /// the network, a new observed address of its own, route states, names, settings and relay
    /// tickets (renewed when due). What a full queue refused is told at the next call.
    fn tell_states(&self, sessions: &mut HashMap<u64, Session>) {
        let Some((relays, states)) = &self.last_read else {
            return;
        };
        for s in sessions.values_mut() {
            if s.removed {
                continue;
            }
            let (Some(net), Some(rows)) = (states.get(&s.network_id), self.nets.get(&s.network_id))
            else {
                continue;
            };
            if !rows.rows().contains_key(&s.key) {
                s.removed = true;
                // Off the embedded relay at once; the session closes the connection after
                // telling the node why.
                self.forwarder.remove(&s.network, &s.key, false);
                let _ = s.tx.try_send(ServerMsg::Error {
                    code: ErrorCode::NodeUnknown,
                    message: "this node was removed from the network by the controller admin; join again with a new token (`mesh join --token-file FILE`)".into(),
                });
                continue;
            }
            // Its own observed address decides what it sees of every peer: when it moved, the
            // peers whose candidates it may probe changed are owed to it (the peers whose rows
            // changed are in the order anyway).
            let now_from = rows.rows().get(&s.key).and_then(|p| p.observed);
            if now_from != s.seen_from {
                let moved = netmap::seen_differently(rows.rows(), s.seen_from, now_from);
                s.owed.extend(moved.filter(|k| *k != s.key));
                s.seen_from = now_from;
            }
            let mine = net.route_states.get(&s.key).cloned().unwrap_or_default();
            if mine != s.route_states {
                let msg = ServerMsg::Routes {
                    routes: mine.clone(),
                };
                if s.tx.try_send(msg).is_ok() {
                    s.route_states = mine;
                }
            }
            if net.names != s.names {
                let msg = ServerMsg::Names {
                    names: net.names.clone(),
                };
                if s.tx.try_send(msg).is_ok() {
                    s.names = net.names.clone();
                }
            }
            if net.birthday_budget != s.birthday_budget {
                let msg = ServerMsg::Settings {
                    birthday_budget: net.birthday_budget,
                };
                if s.tx.try_send(msg).is_ok() {
                    s.birthday_budget = net.birthday_budget;
                }
            }
            if s.relays != *relays
                || s.revoked != net.revoked
                || s.tickets_at.elapsed() >= TICKET_RENEW
            {
                let msg = ServerMsg::Relays {
                    relays: relay_infos(&self.secret, relays, &s.network, &s.key, &net.revoked),
                };
                if s.tx.try_send(msg).is_ok() {
                    s.relays = relays.clone();
                    s.revoked = net.revoked.clone();
                    s.tickets_at = tokio::time::Instant::now();
                }
            }
        }
    }

    /// Queues to every session the peers it was not told yet, while its queue has room; the
    /// rest wait for the next tick. Reads no database: the hub calls it on every tick while a
    /// session lags.
    fn catch_up(&mut self, sessions: &mut HashMap<u64, Session>) {
        for s in sessions.values_mut() {
            self.refill(s);
        }
        // The removals every session of a network was told are forgotten.
        let mut upto: HashMap<i64, u64> = HashMap::new();
        for s in sessions.values().filter(|s| !s.removed) {
            let u = upto.entry(s.network_id).or_insert(u64::MAX);
            *u = (*u).min(s.told_upto);
        }
        for (id, rows) in &mut self.nets {
            let last = rows.last();
            rows.prune(upto.get(id).copied().unwrap_or(last));
        }
    }

    /// Reads the members of a network the hub holds no rows of yet.
    async fn read_network(&mut self, db: &Db, network_id: i64) {
        match db.run(move |s| members(s, network_id)).await {
            Ok(rows) => {
                self.nets.entry(network_id).or_default().update(rows);
            }
            Err(e) => warn!(error = %e, network_id, "cannot read the network's members"),
        }
    }

    /// [`Hub::catch_up`] for one session.
    fn catch_up_one(&mut self, sessions: &mut HashMap<u64, Session>, id: u64) {
        if let Some(s) = sessions.get_mut(&id) {
            self.refill(s);
        }
    }

    /// Whether a session has peers it was not told yet.
    fn lagging(&self, sessions: &HashMap<u64, Session>) -> bool {
        sessions.values().any(|s| {
            !s.removed
                && self
                    .nets
                    .get(&s.network_id)
                    .is_some_and(|rows| behind(s, rows))
        })
    }

    /// Queues to `s` what it was not told yet ([`tell`]), unless it was removed.
    fn refill(&mut self, s: &mut Session) {
        if s.removed {
            return;
        }
        if let Some(rows) = self.nets.get(&s.network_id) {
            if tell(s, rows, &self.stats) {
                self.may_lag = true;
            }
        }
    }
}

/// Whether `s` has peers of `rows` it was not told yet.
fn behind(s: &Session, rows: &netmap::Rows) -> bool {
    !s.owed.is_empty() || rows.last() > s.told_upto
}

/// Queues to `s` what it was not told yet of the peers in `rows` (the peers it is owed, then
/// the changes after its position), in messages of at most [`DELTA_CHUNK`] peers, while its
/// queue has room. Each peer as the rows hold it now: a peer that changed several times while
/// the node lagged is told once. Returns whether `s` is still behind (its queue is full).
fn tell(s: &mut Session, rows: &netmap::Rows, stats: &Stats) -> bool {
    while behind(s, rows) {
        let Ok(permit) = s.tx.try_reserve() else {
            return true;
        };
        let mut chunk: BTreeSet<PublicKey> = BTreeSet::new();
        while chunk.len() < DELTA_CHUNK {
            let Some(k) = s.owed.pop_first() else { break };
            chunk.insert(k);
        }
        for (at, k) in rows.changed_after(s.told_upto) {
            if chunk.len() >= DELTA_CHUNK {
                break;
            }
            s.told_upto = at;
            chunk.insert(*k);
        }
        if let Some(msg) = rows.delta(chunk, &s.key) {
            permit.send(msg);
            Stats::inc(&stats.deltas_pushed, 1);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mesh_control::channel::{Receiver, Sender};
    use mesh_proto::control::decode_server;

    /// A state dir (removed when dropped) whose store has network "prod" and a reusable
    /// token "tok".
    fn prod_store(name: &str) -> (TempDir, crate::store::Store) {
        let dir =
            TempDir(std::env::temp_dir().join(format!("mesh-hub-{name}-{}", std::process::id())));
        let state = StateDir::open(&dir.0).unwrap();
        let store = state.open_store().unwrap();
        let now = unix_now();
        store
            .create_network("prod", "100.64.0.0/16".parse().unwrap(), now)
            .unwrap();
        store
            .create_token(
                "prod",
                &crate::store::NewToken::for_test("tok", b"secret", true),
                now,
            )
            .unwrap();
        (dir, store)
    }

    fn test_hub() -> Hub {
        Hub {
            secret: [1; 32],
            forwarder: Forwarder::new(),
            stats: Arc::new(Stats::default()),
            nets: HashMap::new(),
            last_read: None,
            may_lag: false,
        }
    }

    /// A session of network "prod" at the start of its network's order of changes.
    fn test_session(network_id: i64, key: PublicKey, tx: mpsc::Sender<ServerMsg>) -> Session {
        Session {
            network_id,
            network: "prod".into(),
            key,
            tx,
            told_upto: 0,
            owed: BTreeSet::new(),
            seen_from: None,
            removed: false,
            relays: Vec::new(),
            revoked: Vec::new(),
            tickets_at: tokio::time::Instant::now(),
            birthday_budget: None,
            route_states: Vec::new(),
            names: Vec::new(),
        }
    }

    /// A session that missed a burst of changes (its queue was full) gets them in messages of
    /// at most `DELTA_CHUNK` peers as its queue drains, and ends with the whole network.
    #[tokio::test]
    async fn a_backlog_goes_out_in_bounded_messages() {
        let (_dir, mut store) = prod_store("backlog");
        let now = unix_now();
        let mut keys = Vec::new();
        let mut network_id = 0;
        for i in 0..1_200u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i + 1).to_le_bytes());
            let key = PublicKey(k);
            let adm = store
                .join(
                    "tok",
                    b"secret",
                    &key,
                    NameRequest::Preferred(&format!("n{i}")),
                    Candidates::default(),
                    now,
                )
                .unwrap();
            network_id = adm.network_id;
            keys.push(key);
        }
        let db = Db::start(store, "test-hub-db").unwrap();
        let mut hub = test_hub();
        let (tx, mut rx) = mpsc::channel(2);
        let me = keys[0];
        // Its Welcome told it of nobody: the first push owes it 1,199 peers.
        let mut sessions = HashMap::from([(1, test_session(network_id, me, tx))]);
        let mut known = PeerMap::new();
        let mut largest = 0;
        for _ in 0..10 {
            hub.push(&db, &mut sessions).await;
            while let Ok(msg) = rx.try_recv() {
                if let ServerMsg::PeersChanged { upsert, .. } = &msg {
                    largest = largest.max(upsert.len());
                }
                netmap::apply(&mut known, &msg);
            }
        }
        assert_eq!(largest, DELTA_CHUNK, "one message held {largest} peers");
        assert_eq!(known.len(), keys.len() - 1, "the backlog was not all sent");
        assert!(sessions[&1].owed.is_empty());
        assert!(!hub.lagging(&sessions));
    }

    /// A setting the session's full queue refused is told at a later retry, which reads no
    /// database: the hub keeps what it last read.
    #[tokio::test]
    async fn a_refused_setting_is_retried_from_the_last_read() {
        let (_dir, mut store) = prod_store("retry");
        let key = PublicKey([7; 32]);
        let network_id = store
            .join(
                "tok",
                b"secret",
                &key,
                NameRequest::Preferred("n0"),
                Candidates::default(),
                unix_now(),
            )
            .unwrap()
            .network_id;
        store.set_birthday_budget("prod", Some(17)).unwrap();
        let db = Db::start(store, "test-hub-retry").unwrap();
        let mut hub = test_hub();
        let (tx, mut rx) = mpsc::channel(1);
        let mut sessions = HashMap::from([(1, test_session(network_id, key, tx.clone()))]);
        // The queue is full when the hub reads the setting.
        tx.try_send(ServerMsg::Left).unwrap();
        hub.push(&db, &mut sessions).await;
        assert_eq!(sessions[&1].birthday_budget, None);
        // The database goes away; the node reads its queue; the retry tells the setting.
        drop(db);
        assert!(matches!(rx.try_recv(), Ok(ServerMsg::Left)));
        hub.tell_states(&mut sessions);
        assert!(
            matches!(
                rx.try_recv(),
                Ok(ServerMsg::Settings {
                    birthday_budget: Some(17)
                })
            ),
            "the setting was not retried"
        );
        assert_eq!(sessions[&1].birthday_budget, Some(17));
        // Told once.
        hub.tell_states(&mut sessions);
        assert!(rx.try_recv().is_err());
    }

    /// A session whose node reads nothing while the network changes under it (joins, and
    /// members removed) holds no copies of what it was not told: its backlog is a position in
    /// the network's order of changes. When it reads again it gets each peer once, as the rows
    /// hold it then, removals included; and the hub then forgets the removed keys.
    #[tokio::test]
    async fn a_node_that_lags_is_told_the_latest_rows_once() {
        let (_dir, mut store) = prod_store("lag");
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i + 1).to_le_bytes());
            PublicKey(k)
        };
        let join = move |store: &mut crate::store::Store, i: u32| {
            store
                .join(
                    "tok",
                    b"secret",
                    &key(i),
                    NameRequest::Preferred(&format!("n{i}")),
                    Candidates::default(),
                    unix_now(),
                )
                .unwrap()
                .network_id
        };
        let mut network_id = 0;
        for i in 0..100 {
            network_id = join(&mut store, i);
        }
        let db = Db::start(store, "test-hub-lag").unwrap();
        let mut hub = test_hub();
        let (tx, mut rx) = mpsc::channel(1);
        let me = key(0);
        let mut sessions = HashMap::from([(1, test_session(network_id, me, tx))]);
        let mut known = PeerMap::new();
        // The node reads its first message, then stops reading: its queue stays full.
        hub.push(&db, &mut sessions).await;
        netmap::apply(&mut known, &rx.try_recv().unwrap());
        hub.push(&db, &mut sessions).await;
        // 1,000 more join in ten rounds and 40 of the first are removed, a push after each.
        for round in 0..10u32 {
            db.run(move |s| {
                for i in 0..100 {
                    join(s, 100 + round * 100 + i);
                }
                for i in 0..4 {
                    s.remove_node("prod", &format!("n{}", 1 + round * 4 + i), unix_now())
                        .unwrap();
                }
                Ok(())
            })
            .await
            .unwrap();
            hub.push(&db, &mut sessions).await;
        }
        let session = &sessions[&1];
        assert!(
            session.owed.len() <= 100,
            "owed {} keys",
            session.owed.len()
        );
        // The hub knows to look for laggards at its ticks.
        assert!(hub.may_lag);
        // The node reads again.
        let mut messages = 0;
        for _ in 0..20_000 {
            while let Ok(msg) = rx.try_recv() {
                netmap::apply(&mut known, &msg);
                messages += 1;
            }
            if !hub.lagging(&sessions) {
                break;
            }
            hub.catch_up(&mut sessions);
        }
        while let Ok(msg) = rx.try_recv() {
            netmap::apply(&mut known, &msg);
            messages += 1;
        }
        let rows = &hub.nets[&network_id];
        assert_eq!(known, netmap::view_for_map(rows.rows(), &me));
        assert_eq!(known.len(), 1_100 - 40 - 1);
        // 1,059 peers in messages of at most DELTA_CHUNK, plus the removals.
        assert!(
            messages <= 1 + 1_100 / DELTA_CHUNK + 1,
            "{messages} messages"
        );
        hub.catch_up(&mut sessions);
        assert_eq!(hub.nets[&network_id].remembered(), 1_100 - 40);
    }

    #[test]
    fn heartbeats_burst_then_one_per_second_then_abuse() {
        let t0 = Instant::now();
        let mut l = HeartbeatLimiter::new(t0);
        let accepted = (0..1000).filter(|_| l.check(t0) == Verdict::Accept).count();
        assert_eq!(accepted, HEARTBEAT_BURST as usize);
        // One more per second after that.
        assert_eq!(l.check(t0 + Duration::from_millis(500)), Verdict::Drop);
        assert_eq!(l.check(t0 + Duration::from_secs(1)), Verdict::Accept);
        // The agent's own pace (every 10 s) is never limited.
        let mut l = HeartbeatLimiter::new(t0);
        for n in 1..100 {
            assert_eq!(l.check(t0 + Duration::from_secs(10 * n)), Verdict::Accept);
        }
        // A sustained flood is closed.
        let mut l = HeartbeatLimiter::new(t0);
        let verdicts: Vec<Verdict> = (0..(HEARTBEAT_ABUSE + 10))
            .map(|i| l.check(t0 + Duration::from_micros(u64::from(i))))
            .collect();
        assert_eq!(verdicts.last(), Some(&Verdict::Abuse));
    }

    struct Lab {
        _dir: TempDir,
        addr: SocketAddr,
        controller_key: PublicKey,
        stats: Arc<Stats>,
        forwarder: Arc<Forwarder>,
        state: StateDir,
        changes: Arc<dyn Fn() -> u64 + Send + Sync>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn lab() -> Lab {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-server-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let state = StateDir::open(&dir).unwrap();
        let store = state.open_store().unwrap();
        store
            .create_network("prod", "100.64.0.0/16".parse().unwrap(), unix_now())
            .unwrap();
        store
            .create_token(
                "prod",
                &crate::store::NewToken::for_test("tok", b"secret", true),
                unix_now(),
            )
            .unwrap();
        let controller = Controller::bind(
            &state,
            "127.0.0.1:0".parse().unwrap(),
            ServerLimits::default(),
        )
        .unwrap();
        let addr = controller.local_addr().unwrap();
        let stats = controller.stats();
        let forwarder = controller.forwarder();
        let ctx = controller.ctx.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(controller.run(async move {
            let _ = stopped.await;
        }));
        Lab {
            _dir: TempDir(dir),
            addr,
            controller_key: state.controller_public().unwrap(),
            stats,
            forwarder,
            state,
            changes: Arc::new(move || ctx.db.changes()),
            _stop: stop,
        }
    }

    struct Client {
        conn: quinn::Connection,
        tx: Sender,
        rx: Receiver,
        _endpoint: quinn::Endpoint,
    }

    async fn join(lab: &Lab, seed: u8, endpoints: Vec<SocketAddr>) -> (Client, ServerMsg) {
        let endpoint = quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = endpoint.connect(lab.addr, "mesh").unwrap().await.unwrap();
        let (mut tx, mut rx) =
            channel::initiate(&Link::Quic(conn.clone()), &[seed; 32], &lab.controller_key)
                .await
                .unwrap();
        let msg = ClientMsg::Join {
            token_id: "tok".into(),
            token_secret: mesh_proto::hex::encode(b"secret"),
            name: format!("n{seed}"),
            endpoints,
            exact_name: false,
        };
        tx.send(&msg.encode()).await.unwrap();
        let welcome = decode_server(&rx.recv().await.unwrap()).unwrap();
        (
            Client {
                conn,
                tx,
                rx,
                _endpoint: endpoint,
            },
            welcome,
        )
    }

    /// A node with key `[seed; 32]` asks to join network prod by network id.
    async fn ask_as(lab: &Lab, seed: u8, name: &str) -> (Client, ServerMsg) {
        let endpoint = quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = endpoint.connect(lab.addr, "mesh").unwrap().await.unwrap();
        let (mut tx, mut rx) =
            channel::initiate(&Link::Quic(conn.clone()), &[seed; 32], &lab.controller_key)
                .await
                .unwrap();
        let msg = ClientMsg::RequestJoin {
            network: "prod".into(),
            name: name.into(),
            hostname: format!("{name}.example"),
            endpoints: vec![],
            exact_name: false,
        };
        tx.send(&msg.encode()).await.unwrap();
        let first = decode_server(&rx.recv().await.unwrap()).unwrap();
        (
            Client {
                conn,
                tx,
                rx,
                _endpoint: endpoint,
            },
            first,
        )
    }

    #[tokio::test]
    async fn a_waiting_node_gets_its_verdict_on_the_connection_it_asked_on() {
        use crate::store::approval::Who;
        let lab = lab();
        let (mut a, first) = ask_as(&lab, 7, "asker").await;
        assert!(
            matches!(&first, ServerMsg::Pending { name, .. } if name == "asker"),
            "{first:?}"
        );
        // Nothing about the network reaches a node that waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), a.rx.recv())
                .await
                .is_err()
        );
        assert_eq!(lab.stats.waiting.load(Ordering::Relaxed), 1);
        let started = Instant::now();
        lab.state
            .open_store()
            .unwrap()
            .approve("prod", Who::These(&["asker".into()]), "admin", unix_now())
            .unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(5), a.rx.recv())
            .await
            .unwrap()
            .unwrap();
        match decode_server(&bytes).unwrap() {
            ServerMsg::Welcome(w) => assert_eq!(w.name, "asker"),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        let (mut b, first) = ask_as(&lab, 8, "other").await;
        assert!(matches!(first, ServerMsg::Pending { .. }), "{first:?}");
        lab.state
            .open_store()
            .unwrap()
            .reject("prod", Who::These(&["other".into()]), "admin", unix_now())
            .unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(5), b.rx.recv())
            .await
            .unwrap()
            .unwrap();
        match decode_server(&bytes).unwrap() {
            ServerMsg::Error { code, message } => {
                assert_eq!(code, ErrorCode::Rejected);
                assert!(message.contains("rejected"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Asking again is refused at once.
        let (_, again) = ask_as(&lab, 8, "other").await;
        assert!(
            matches!(
                again,
                ServerMsg::Error {
                    code: ErrorCode::Rejected,
                    ..
                }
            ),
            "{again:?}"
        );
        // A network the controller does not have is named as such.
        let endpoint = quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = endpoint.connect(lab.addr, "mesh").unwrap().await.unwrap();
        let (mut tx, mut rx) =
            channel::initiate(&Link::Quic(conn.clone()), &[9; 32], &lab.controller_key)
                .await
                .unwrap();
        let msg = ClientMsg::RequestJoin {
            network: "gone".into(),
            name: "x".into(),
            hostname: String::new(),
            endpoints: vec![],
            exact_name: false,
        };
        tx.send(&msg.encode()).await.unwrap();
        let answer = decode_server(&rx.recv().await.unwrap()).unwrap();
        assert!(
            matches!(
                answer,
                ServerMsg::Error {
                    code: ErrorCode::NetworkUnknown,
                    ..
                }
            ),
            "{answer:?}"
        );
    }

    #[test]
    fn the_request_limiter_admits_a_burst_then_a_rate_and_stays_bounded() {
        let mut l = AskLimiter::default();
        let t = Instant::now();
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let burst = (0..100).filter(|_| l.allow(ip, t)).count();
        assert_eq!(burst, ASK_BURST as usize);
        let later = t + Duration::from_secs(1);
        let more = (0..100).filter(|_| l.allow(ip, later)).count();
        assert_eq!(more, ASK_RATE as usize);
        for i in 0..(ASK_SOURCES as u32 + 500) {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.allow(ip, later);
        }
        assert!(l.sources.len() <= ASK_SOURCES);
        // Every address of one IPv6 /64 shares one bucket.
        let mut l = AskLimiter::default();
        let host =
            |i: u16| std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i));
        let spread = (0..100).filter(|i| l.allow(host(*i), later)).count();
        assert_eq!(spread, ASK_BURST as usize);
        let other = std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert!(l.allow(other, later), "another /64 has its own");
    }

    fn public(seed: u8) -> PublicKey {
        crate::state::public_of(&[seed; 32])
    }

    #[tokio::test]
    async fn a_heartbeat_burst_costs_a_bounded_number_of_writes_and_pushes() {
        let lab = lab();
        let (mut a, _) = join(&lab, 1, vec![]).await;
        let (mut b, _) = join(&lab, 2, vec![]).await;
        // B learns of A... wait for the delta about A's join to settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = (lab.changes)();
        let started = Instant::now();
        // 1,000 heartbeats as fast as possible, each with other endpoints (worst case).
        for i in 0..1000u16 {
            let eps = vec![
                SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                SocketAddr::from(([192, 0, 2, 7], 2000 + i)),
            ];
            let hb = ClientMsg::Heartbeat {
                endpoints: eps,
                home_relay: None,
                nat: None,
                routes: Vec::new(),
                exits: Vec::new(),
            };
            a.tx.send(&hb.encode()).await.unwrap();
        }
        // Let the controller work through them, then count what reached B.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let mut deltas = 0;
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(300), b.rx.recv()).await {
            if matches!(decode_server(&m), Ok(ServerMsg::PeersChanged { .. })) {
                deltas += 1;
            }
        }
        let writes = (lab.changes)() - before;
        let bound = (HEARTBEAT_BURST + elapsed * HEARTBEAT_RATE).ceil() as u64 + 1;
        let dropped = lab.stats.heartbeats_dropped.load(Ordering::Relaxed);
        eprintln!("1000 heartbeats in {elapsed:.2} s: {writes} rows written, {deltas} deltas to a peer, {dropped} dropped");
        assert!(writes <= bound, "{writes} writes > {bound}");
        assert!(deltas as u64 <= bound, "{deltas} deltas > {bound}");
        assert!(dropped >= 1000 - bound, "{dropped}");
        // The loopback and unspecified candidates were refused and counted.
        assert!(lab.stats.candidates_refused.load(Ordering::Relaxed) >= 5);
        // The connection is still up: a burst is not fatal.
        assert!(a.conn.close_reason().is_none());
        // Unchanged heartbeats write nothing.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = (lab.changes)();
        for _ in 0..3 {
            let hb = ClientMsg::Heartbeat {
                endpoints: vec![SocketAddr::from(([192, 0, 2, 7], 2999))],
                home_relay: None,
                nat: None,
                routes: Vec::new(),
                exits: Vec::new(),
            };
            a.tx.send(&hb.encode()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        assert!(
            (lab.changes)() - before <= 1,
            "only the first (a change) is written"
        );
    }

    #[tokio::test]
    async fn a_second_connection_of_the_same_key_replaces_the_first() {
        let lab = lab();
        let (a1, _) = join(&lab, 1, vec![]).await;
        let (a2, _) = join(&lab, 1, vec![]).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), a1.conn.closed())
            .await
            .unwrap();
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(quic::CLOSE_REPLACED))
            }
            other => panic!("{other}"),
        }
        assert_eq!(lab.stats.replaced.load(Ordering::Relaxed), 1);
        // The old session's end does not mark the node offline.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let store = lab.state.open_store().unwrap();
        let nodes = store.nodes("prod", unix_now()).unwrap();
        assert!(nodes[0].online, "{nodes:?}");
        assert!(lab.forwarder.is_connected("prod", &public(1)));
        assert!(a2.conn.close_reason().is_none());
    }

    #[tokio::test]
    async fn a_removed_node_loses_the_relay_at_once() {
        let lab = lab();
        let (mut a, _) = join(&lab, 1, vec![]).await;
        let (_b, _) = join(&lab, 2, vec![]).await;
        assert!(lab.forwarder.is_connected("prod", &public(1)));
        let store = lab.state.open_store().unwrap();
        store.remove_node("prod", "n1", unix_now()).unwrap();
        let started = Instant::now();
        while lab.forwarder.is_connected("prod", &public(1)) {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "still on the relay"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "off the embedded relay {} ms after removal",
            started.elapsed().as_millis()
        );
        // The node is told why, then the connection closes.
        let mut told = false;
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(3), a.rx.recv()).await {
            if let Ok(ServerMsg::Error { code, .. }) = decode_server(&m) {
                assert_eq!(code, ErrorCode::NodeUnknown);
                told = true;
            }
        }
        assert!(told);
        tokio::time::timeout(Duration::from_secs(3), a.conn.closed())
            .await
            .unwrap();
        assert!(
            lab.forwarder.is_connected("prod", &public(2)),
            "others stay"
        );
    }

    /// A network larger than one welcome: a node that joins gets the first part in the
    /// welcome and the rest right after it, and has every peer once it folds them in (as the
    /// agent does, `Welcome::take_rest`), before any other message.
    #[tokio::test]
    async fn a_node_of_a_large_network_gets_every_peer_in_parts() {
        let lab = lab();
        let mut store = lab.state.open_store().unwrap();
        let others = WELCOME_PEERS + DELTA_CHUNK + 52;
        for i in 0..others {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&(i as u32 + 1000).to_le_bytes());
            store
                .join(
                    "tok",
                    b"secret",
                    &PublicKey(key),
                    crate::store::NameRequest::Exact(&format!("bulk-{i}")),
                    crate::store::Candidates {
                        reported: &[],
                        observed: None,
                    },
                    unix_now(),
                )
                .unwrap();
        }
        let (mut a, welcome) = join(&lab, 1, vec![]).await;
        let ServerMsg::Welcome(mut w) = welcome else {
            panic!("{welcome:?}")
        };
        assert_eq!(w.peers.len(), WELCOME_PEERS);
        assert_eq!(w.more_peers as usize, others - WELCOME_PEERS);
        let mut parts = 0;
        while w.more_peers > 0 {
            let m = decode_server(&a.rx.recv().await.unwrap()).unwrap();
            w.take_rest(m).unwrap();
            parts += 1;
        }
        assert_eq!(parts, 2);
        let keys: std::collections::HashSet<PublicKey> = w.peers.iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), others, "every peer, once");
    }

    #[tokio::test]
    async fn relays_carry_revocations_of_removed_nodes() {
        let lab = lab();
        let store = lab.state.open_store().unwrap();
        let relay_secret = [42u8; 32];
        let relay_key = crate::state::public_of(&relay_secret);
        store
            .add_relay("eu-1", "192.0.2.10:7444", None, &relay_key, unix_now())
            .unwrap();
        let (_a, _) = join(&lab, 1, vec![]).await;
        let (mut b, _) = join(&lab, 2, vec![]).await;
        store.remove_node("prod", "n1", unix_now()).unwrap();
        let relay_side = TicketKey::new(&relay_secret, &lab.controller_key);
        let mut found = None;
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(3), b.rx.recv()).await {
            if let Ok(ServerMsg::Relays { relays }) = decode_server(&m) {
                if let Some(r) = relays[0].revoked.first() {
                    found = Some(r.clone());
                    break;
                }
            }
        }
        let r = found.expect("a revocation for the removed node");
        assert_eq!(r.key, public(1));
        assert!(relay_side.verify_revocation("prod", &r));
        assert!(r.expires >= unix_now() + TICKET_LIFETIME.as_secs() - 5);
    }

    #[tokio::test]
    async fn peers_get_only_candidates_they_may_probe() {
        let lab = lab();
        // A reports a loopback address, an overlay address, and a "LAN" address; all nodes here
        // come from 127.0.0.1, i.e. behind the same public address, so B gets the LAN one.
        let lan = SocketAddr::from(([198, 51, 100, 4], 51820));
        let (_a, _) = join(
            &lab,
            1,
            vec![
                SocketAddr::from(([127, 0, 0, 1], 5)),
                SocketAddr::from(([100, 64, 0, 9], 5)),
                lan,
            ],
        )
        .await;
        let (_b, welcome) = join(&lab, 2, vec![]).await;
        let ServerMsg::Welcome(w) = welcome else {
            panic!("{welcome:?}")
        };
        let a = w.peers.iter().find(|p| p.key == public(1)).unwrap();
        assert_eq!(a.endpoints[0], a.observed.unwrap(), "observed first");
        assert_eq!(a.endpoints[1..], [lan]);
        assert_eq!(lab.stats.candidates_refused.load(Ordering::Relaxed), 2);
    }
}
