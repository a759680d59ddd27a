//! The tokio/quinn driver: accepts node connections, runs the Noise channel, applies join/hello
//! to the store, and pushes peer-list deltas through the hub.

use crate::netmap::{self, PeerMap};
use crate::state::{unix_now, StateDir};
use crate::store::{Admission, RelayRow, StoreError};
use anyhow::Context as _;
use mesh_control::{channel, quic};
use mesh_proto::control::{
    decode_client, ClientMsg, ErrorCode, RelayInfo, ServerMsg, MAX_ENDPOINTS,
};
use mesh_proto::PublicKey;
use mesh_relay::{Forwarder, TicketKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// How often the hub looks for changes made by other connections or processes.
const POLL: Duration = Duration::from_millis(100);
/// A full recompute at least this often, to retry deltas that could not be queued.
const RESYNC: Duration = Duration::from_secs(2);
/// Time a node has to complete the handshake and send its first message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a relay ticket admits a node. While the node is connected here, the hub sends it
/// fresh tickets every [`TICKET_RENEW`]; a node cut off from the controller keeps its relays for
/// the rest of the lifetime.
const TICKET_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Tickets are renewed when they are this old.
const TICKET_RENEW: Duration = Duration::from_secs(6 * 3600);

struct Ctx {
    secret: [u8; 32],
    /// The embedded relay: connected nodes, by network and key.
    forwarder: Arc<Forwarder>,
    store: Mutex<crate::store::Store>,
    hub: mpsc::UnboundedSender<HubCmd>,
    next_id: AtomicU64,
}

enum HubCmd {
    Register {
        id: u64,
        network_id: i64,
        network: String,
        key: PublicKey,
        tx: mpsc::Sender<ServerMsg>,
        sent: PeerMap,
        relays: Vec<RelayRow>,
    },
    Unregister {
        id: u64,
    },
}

/// Runs the controller until SIGINT/SIGTERM.
pub async fn serve(
    state: StateDir,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let secret = state.controller_key()?;
    let store = state.open_store()?;
    store.reset_connections()?;
    let endpoint = quic::bind_server(listen, &secret)?;
    state.write_listen_addr(listen)?;
    let (hub_tx, hub_rx) = mpsc::unbounded_channel();
    let hub_store = state.open_store()?;
    tokio::spawn(run_hub(hub_store, hub_rx, secret));
    let forwarder = Forwarder::new();
    let ctx = Arc::new(Ctx {
        secret,
        forwarder: forwarder.clone(),
        store: Mutex::new(store),
        hub: hub_tx,
        next_id: AtomicU64::new(1),
    });
    if let Some(addr) = metrics_listen {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let store = state.open_store()?;
        info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, Some(store), forwarder).await {
                warn!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    info!(%listen, key = %state.controller_public()?, "controller listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ctx = ctx.clone();
                let remote = incoming.remote_address();
                tokio::spawn(async move {
                    if let Err(e) = handle(incoming, ctx).await {
                        debug!(%remote, error = %format!("{e:#}"), "connection ended");
                    }
                }.instrument(tracing::info_span!("node", %remote)));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("shutting down");
    endpoint.close(0u32.into(), b"controller shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

fn lock(ctx: &Ctx) -> std::sync::MutexGuard<'_, crate::store::Store> {
    // A panic while holding the lock would be a bug; keep serving with the data as it is.
    ctx.store.lock().unwrap_or_else(|p| p.into_inner())
}

/// Observed address first, then what the node reported, without duplicates.
fn merge_endpoints(observed: SocketAddr, reported: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = vec![observed];
    for e in reported {
        if !out.contains(e) && out.len() < MAX_ENDPOINTS {
            out.push(*e);
        }
    }
    out
}

/// The standalone relays with a ticket for `key` in `network` at each.
fn relay_infos(
    secret: &[u8; 32],
    relays: &[RelayRow],
    network: &str,
    key: &PublicKey,
) -> Vec<RelayInfo> {
    let expires = unix_now() + TICKET_LIFETIME.as_secs();
    relays
        .iter()
        .map(|r| RelayInfo {
            name: r.name.clone(),
            addr: r.addr.clone(),
            key: r.key,
            ticket: TicketKey::new(secret, &r.key).issue(network, key, expires),
        })
        .collect()
}

async fn refuse(
    tx: &mut channel::Sender,
    conn: &quinn::Connection,
    code: ErrorCode,
    message: String,
) {
    info!(?code, %message, "refused");
    let _ = tx.send(&ServerMsg::Error { code, message }.encode()).await;
    tx.finish();
    // Let the node read the error before the connection goes away.
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
}

async fn handle(incoming: quinn::Incoming, ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let conn = incoming.await?;
    let (mut tx, mut rx, key) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, channel::accept(&conn, &ctx.secret)).await??;
    let (in_tx, mut in_rx) = mpsc::channel::<Result<ClientMsg, String>>(16);
    tokio::spawn(async move {
        loop {
            let msg = match rx.recv().await {
                Ok(bytes) => decode_client(&bytes).map_err(|e| e.to_string()),
                Err(_) => break,
            };
            let bad = msg.is_err();
            if in_tx.send(msg).await.is_err() || bad {
                break;
            }
        }
    });
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, in_rx.recv()).await?;
    let now = unix_now();
    let result: Result<Admission, StoreError> = match first {
        Some(Ok(ClientMsg::Join {
            token_id,
            token_secret,
            name,
            endpoints,
        })) => match mesh_proto::hex::decode(&token_secret) {
            Some(secret) => lock(&ctx).join(
                &token_id,
                &secret,
                &key,
                &name,
                &merge_endpoints(conn.remote_address(), &endpoints),
                now,
            ),
            None => Err(StoreError::Refused {
                code: ErrorCode::TokenInvalid,
                message: "join token secret is not hex".into(),
            }),
        },
        Some(Ok(ClientMsg::Hello {
            network,
            endpoints,
            home_relay,
        })) => {
            let mut store = lock(&ctx);
            store
                .hello(
                    &network,
                    &key,
                    &merge_endpoints(conn.remote_address(), &endpoints),
                    now,
                )
                .and_then(|adm| {
                    store.set_home_relay(adm.network_id, &key, home_relay.as_deref())?;
                    Ok(adm)
                })
        }
        Some(Ok(_)) => Err(StoreError::Refused {
            code: ErrorCode::BadRequest,
            message: "the first message must be join or hello".into(),
        }),
        Some(Err(e)) => Err(StoreError::Refused {
            code: ErrorCode::BadRequest,
            message: format!("malformed message: {e}"),
        }),
        None => return Ok(()),
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
    info!(node = %adm.name, %key, address = %adm.address, network = %adm.network, "node connected");
    let (peers, relays) = {
        let store = lock(&ctx);
        (store.peers(adm.network_id)?, store.relays()?)
    };
    let view = netmap::view_for(&peers, &key);
    tx.send(
        &ServerMsg::Welcome(mesh_proto::control::Welcome {
            network: adm.network.clone(),
            name: adm.name.clone(),
            address: adm.address,
            prefix_len: adm.prefix_len,
            peers: view.values().cloned().collect(),
            relays: relay_infos(&ctx.secret, &relays, &adm.network, &key),
            observed: Some(conn.remote_address()),
        })
        .encode(),
    )
    .await?;
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let (push_tx, mut push_rx) = mpsc::channel(64);
    let _ = ctx.hub.send(HubCmd::Register {
        id,
        network_id: adm.network_id,
        network: adm.network.clone(),
        key,
        tx: push_tx,
        sent: view,
        relays,
    });
    let relay = tokio::spawn({
        let (forwarder, conn, network) = (ctx.forwarder.clone(), conn.clone(), adm.network.clone());
        async move { forwarder.serve(&network, key, conn).await }
    });
    let mut left = false;
    loop {
        tokio::select! {
            msg = in_rx.recv() => match msg {
                Some(Ok(ClientMsg::Heartbeat { endpoints, home_relay })) => {
                    let eps = merge_endpoints(conn.remote_address(), &endpoints);
                    let store = lock(&ctx);
                    store.heartbeat(adm.network_id, &key, &eps, unix_now())?;
                    store.set_home_relay(adm.network_id, &key, home_relay.as_deref())?;
                }
                Some(Ok(ClientMsg::Leave)) => {
                    lock(&ctx).leave(adm.network_id, &key, unix_now())?;
                    info!(node = %adm.name, "node left the network");
                    left = true;
                    let _ = tx.send(&ServerMsg::Left.encode()).await;
                    tx.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
                    break;
                }
                Some(Ok(other)) => debug!(?other, "unexpected message ignored"),
                Some(Err(e)) => {
                    warn!(error = %e, "malformed message; closing");
                    break;
                }
                None => break,
            },
            out = push_rx.recv() => match out {
                Some(msg) => {
                    let fatal = matches!(msg, ServerMsg::Error { .. });
                    tx.send(&msg.encode()).await?;
                    if fatal {
                        tx.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
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
    if !left {
        lock(&ctx).disconnected(adm.network_id, &key, unix_now())?;
    }
    info!(node = %adm.name, "node disconnected");
    Ok(())
}

struct Session {
    network_id: i64,
    network: String,
    key: PublicKey,
    tx: mpsc::Sender<ServerMsg>,
    sent: PeerMap,
    removed: bool,
    /// The relay list last sent, and when its tickets were made.
    relays: Vec<RelayRow>,
    tickets_at: tokio::time::Instant,
}

/// Owns the list of connected sessions; pushes deltas when the database changes.
async fn run_hub(
    store: crate::store::Store,
    mut rx: mpsc::UnboundedReceiver<HubCmd>,
    secret: [u8; 32],
) {
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut version = store.data_version().ok();
    let mut poll = tokio::time::interval(POLL);
    let mut last_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(HubCmd::Register { id, network_id, network, key, tx, sent, relays }) => {
                    let tickets_at = tokio::time::Instant::now();
                    sessions.insert(id, Session { network_id, network, key, tx, sent, removed: false, relays, tickets_at });
                    // Changes between the Welcome and now must not be lost.
                    push(&store, &mut sessions, &secret);
                }
                Some(HubCmd::Unregister { id }) => { sessions.remove(&id); }
                None => return,
            },
            _ = poll.tick() => {
                let v = store.data_version().ok();
                if v != version || last_full.elapsed() >= RESYNC {
                    version = v;
                    last_full = tokio::time::Instant::now();
                    push(&store, &mut sessions, &secret);
                }
            }
        }
    }
}

fn push(store: &crate::store::Store, sessions: &mut HashMap<u64, Session>, secret: &[u8; 32]) {
    let relays = match store.relays() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read relays");
            return;
        }
    };
    let mut by_network: HashMap<i64, Vec<mesh_proto::control::PeerInfo>> = HashMap::new();
    for s in sessions.values_mut() {
        if s.removed {
            continue;
        }
        let peers = match by_network.get(&s.network_id) {
            Some(p) => p,
            None => match store.peers(s.network_id) {
                Ok(p) => by_network.entry(s.network_id).or_insert(p),
                Err(e) => {
                    warn!(error = %e, "cannot read peers");
                    return;
                }
            },
        };
        if !peers.iter().any(|p| p.key == s.key) {
            s.removed = true;
            let _ = s.tx.try_send(ServerMsg::Error {
                code: ErrorCode::NodeUnknown,
                message: "this node was removed from the network by the controller admin; join again with a new token (`mesh join <token>`)".into(),
            });
            continue;
        }
        let view = netmap::view_for(peers, &s.key);
        if let Some(delta) = netmap::diff(&s.sent, &view) {
            if s.tx.try_send(delta).is_ok() {
                s.sent = view;
            }
        }
        if s.relays != relays || s.tickets_at.elapsed() >= TICKET_RENEW {
            let msg = ServerMsg::Relays {
                relays: relay_infos(secret, &relays, &s.network, &s.key),
            };
            if s.tx.try_send(msg).is_ok() {
                s.relays = relays.clone();
                s.tickets_at = tokio::time::Instant::now();
            }
        }
    }
}
