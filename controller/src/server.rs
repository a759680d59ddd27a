//! The tokio/quinn driver: accepts node connections, runs the Noise channel, applies join/hello
//! to the store, and pushes peer-list deltas through the hub.

use crate::netmap::{self, PeerMap};
use crate::state::{unix_now, StateDir};
use crate::store::{Admission, StoreError};
use anyhow::Context as _;
use mesh_control::{channel, quic};
use mesh_proto::control::{decode_client, ClientMsg, ErrorCode, ServerMsg, MAX_ENDPOINTS};
use mesh_proto::PublicKey;
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

/// Connected nodes by (network, key): where the relay sends frames.
type RelayTable = Mutex<HashMap<(i64, PublicKey), quinn::Connection>>;

struct Ctx {
    secret: [u8; 32],
    relay: RelayTable,
    store: Mutex<crate::store::Store>,
    hub: mpsc::UnboundedSender<HubCmd>,
    next_id: AtomicU64,
}

enum HubCmd {
    Register {
        id: u64,
        network_id: i64,
        key: PublicKey,
        tx: mpsc::Sender<ServerMsg>,
        sent: PeerMap,
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
    let socket =
        std::net::UdpSocket::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    state.write_listen_addr(listen)?;
    let endpoint = quinn::Endpoint::new(
        quic::controller_endpoint_config(&secret),
        Some(quic::server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let (hub_tx, hub_rx) = mpsc::unbounded_channel();
    let hub_store = state.open_store()?;
    tokio::spawn(run_hub(hub_store, hub_rx));
    let ctx = Arc::new(Ctx {
        secret,
        relay: Mutex::new(HashMap::new()),
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
            if let Err(e) = crate::metrics::serve(addr, store).await {
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

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
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
        })) => match decode_hex(&token_secret) {
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
        Some(Ok(ClientMsg::Hello { network, endpoints })) => lock(&ctx).hello(
            &network,
            &key,
            &merge_endpoints(conn.remote_address(), &endpoints),
            now,
        ),
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
    let peers = lock(&ctx).peers(adm.network_id)?;
    let view = netmap::view_for(&peers, &key);
    tx.send(
        &ServerMsg::Welcome {
            network: adm.network.clone(),
            name: adm.name.clone(),
            address: adm.address,
            prefix_len: adm.prefix_len,
            peers: view.values().cloned().collect(),
        }
        .encode(),
    )
    .await?;
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let (push_tx, mut push_rx) = mpsc::channel(64);
    let _ = ctx.hub.send(HubCmd::Register {
        id,
        network_id: adm.network_id,
        key,
        tx: push_tx,
        sent: view,
    });
    relay_table(&ctx).insert((adm.network_id, key), conn.clone());
    let relay = tokio::spawn(relay_from(ctx.clone(), conn.clone(), adm.network_id, key));
    let mut left = false;
    loop {
        tokio::select! {
            msg = in_rx.recv() => match msg {
                Some(Ok(ClientMsg::Heartbeat { endpoints })) => {
                    let eps = merge_endpoints(conn.remote_address(), &endpoints);
                    lock(&ctx).heartbeat(adm.network_id, &key, &eps, unix_now())?;
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
    relay.abort();
    {
        let mut table = relay_table(&ctx);
        if table
            .get(&(adm.network_id, key))
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            table.remove(&(adm.network_id, key));
        }
    }
    let _ = ctx.hub.send(HubCmd::Unregister { id });
    if !left {
        lock(&ctx).disconnected(adm.network_id, &key, unix_now())?;
    }
    info!(node = %adm.name, "node disconnected");
    Ok(())
}

fn relay_table(
    ctx: &Ctx,
) -> std::sync::MutexGuard<'_, HashMap<(i64, PublicKey), quinn::Connection>> {
    ctx.relay.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay: forwards every frame `key` sends to the node it names, in the same network only,
/// rewriting the key to the sender's. Malformed frames and unknown destinations are dropped.
/// The relay sees only WireGuard ciphertext.
async fn relay_from(ctx: Arc<Ctx>, conn: quinn::Connection, network_id: i64, key: PublicKey) {
    let mut dropped: u64 = 0;
    while let Ok(datagram) = conn.read_datagram().await {
        let dst = match mesh_proto::relay::decode(&datagram) {
            Ok(f) => f.key,
            Err(_) => {
                dropped += 1;
                continue;
            }
        };
        let target = relay_table(&ctx).get(&(network_id, dst)).cloned();
        let Some(target) = target else {
            dropped += 1;
            continue;
        };
        let mut frame = datagram.to_vec();
        if mesh_proto::relay::set_key(&mut frame, &key).is_err()
            || target.send_datagram(frame.into()).is_err()
        {
            dropped += 1;
        }
    }
    if dropped > 0 {
        debug!(node = %key, dropped, "relay frames dropped");
    }
}

struct Session {
    network_id: i64,
    key: PublicKey,
    tx: mpsc::Sender<ServerMsg>,
    sent: PeerMap,
    removed: bool,
}

/// Owns the list of connected sessions; pushes deltas when the database changes.
async fn run_hub(store: crate::store::Store, mut rx: mpsc::UnboundedReceiver<HubCmd>) {
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut version = store.data_version().ok();
    let mut poll = tokio::time::interval(POLL);
    let mut last_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(HubCmd::Register { id, network_id, key, tx, sent }) => {
                    sessions.insert(id, Session { network_id, key, tx, sent, removed: false });
                    // Changes between the Welcome and now must not be lost.
                    push(&store, &mut sessions);
                }
                Some(HubCmd::Unregister { id }) => { sessions.remove(&id); }
                None => return,
            },
            _ = poll.tick() => {
                let v = store.data_version().ok();
                if v != version || last_full.elapsed() >= RESYNC {
                    version = v;
                    last_full = tokio::time::Instant::now();
                    push(&store, &mut sessions);
                }
            }
        }
    }
}

fn push(store: &crate::store::Store, sessions: &mut HashMap<u64, Session>) {
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
    }
}
