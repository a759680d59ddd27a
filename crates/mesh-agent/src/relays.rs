//! Standalone relays: the agent keeps a link (QUIC on its one UDP socket, or TCP where UDP does
//! not get through: see [`crate::dial`]) to every relay
//! the controller announces, picks the nearest as its home, and tells the controller, so that
//! peers send it relayed traffic there. Without standalone relays (or while none is reachable)
//! the home is the controller's embedded relay. An admin who deploys regional relays wants
//! relayed traffic on them, so the controller's relay does not compete with them.
//!
//! Each relay has its own task: connect (Noise pinned to the relay's key, then the ticket),
//! hand the connection to the data plane, renew the ticket when the controller sends a fresh
//! one, and reconnect with backoff when the connection goes.
//!
//! It also carries the controller's revocations (nodes removed from the network) to each relay
//! that accepts them, so that a removed node loses the relays at once; the relay checks them.

use crate::dataplane::DataCmd;
use crate::dial::{Dialer, Target};
use mesh_control::Link;
use mesh_proto::control::{RelayInfo, Revocation, Ticket};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_relay::client::{self, RelaySession};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts to reach a relay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the home relay is reconsidered.
const HOME_CHECK: Duration = Duration::from_secs(5);
/// Another relay becomes home only when it is this much nearer (ratio and absolute), so that
/// jitter does not make the home flap.
const HOME_HYSTERESIS: f64 = 0.75;
const HOME_MIN_GAIN: Duration = Duration::from_millis(5);

/// What `mesh status` shows about one relay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayStatus {
    /// Region name (`controller` for the embedded relay).
    pub name: String,
    /// Address dialled.
    pub addr: String,
    /// Whether the node is admitted there now.
    pub connected: bool,
    /// The transport of the link: `quic`, or `tcp` where UDP does not get through.
    pub transport: Option<String>,
    /// Smoothed round-trip time.
    pub rtt_ms: Option<u64>,
    /// Whether this is the node's home relay.
    pub home: bool,
    /// The node's address as this relay sees it.
    pub observed: Option<SocketAddr>,
    /// Last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Shared with the control loop and the local API.
#[derive(Clone, Default)]
pub struct RelayShared {
    /// Per relay, for status.
    pub status: Arc<Mutex<BTreeMap<String, RelayStatus>>>,
    /// Live connections, by relay name.
    conns: Arc<Mutex<BTreeMap<String, Link>>>,
    /// Signalled when a connection comes or goes.
    changed: Arc<tokio::sync::Notify>,
}

impl RelayShared {
    /// Addresses the relays observe for this node: endpoint candidates.
    pub fn observed(&self) -> Vec<SocketAddr> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SocketAddr> = status
            .values()
            .filter_map(|s| s.observed)
            .filter(|a| !a.ip().is_loopback() && !a.ip().is_unspecified())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn set(&self, name: &str, f: impl FnOnce(&mut RelayStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(name) {
            f(s);
        }
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Link>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything the relay tasks need.
#[derive(Clone)]
pub struct RelayCtx {
    /// Opens links (QUIC on the node's shared UDP socket, or TCP).
    pub dialer: Dialer,
    /// Node private key.
    pub node_key: [u8; 32],
    /// The data plane.
    pub data: mpsc::Sender<DataCmd>,
    /// Status and connections.
    pub shared: RelayShared,
}

struct Running {
    info: RelayInfo,
    ticket: watch::Sender<Ticket>,
    revoked: watch::Sender<Vec<Revocation>>,
    task: tokio::task::JoinHandle<()>,
}

/// Follows the relay list from the controller until `shutdown`; publishes the home relay
/// (`None`: the controller's) on `home`.
pub async fn run(
    ctx: RelayCtx,
    mut list: watch::Receiver<Vec<RelayInfo>>,
    home: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut check = tokio::time::interval(HOME_CHECK);
    loop {
        let wanted: Vec<RelayInfo> = list.borrow_and_update().clone();
        // Stop relays that went away or changed address or key.
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                !wanted.iter().any(|w| {
                    &w.name == *name
                        && w.addr == r.info.addr
                        && w.tcp == r.info.tcp
                        && w.key == r.info.key
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = running.remove(&name) {
                r.task.abort();
                ctx.shared.conns().remove(&name);
                ctx.shared
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                let _ = ctx
                    .data
                    .send(DataCmd::RelayRegion(name.clone(), None))
                    .await;
                info!(relay = %name, "relay no longer used");
            }
        }
        for info in wanted {
            match running.get(&info.name) {
                Some(r) => {
                    let _ = r.ticket.send_if_modified(|t| {
                        let newer = t.expires < info.ticket.expires;
                        if newer {
                            *t = info.ticket.clone();
                        }
                        newer
                    });
                    let _ = r.revoked.send_if_modified(|v| {
                        let changed = *v != info.revoked;
                        if changed {
                            v.clone_from(&info.revoked);
                        }
                        changed
                    });
                }
                None => {
                    ctx.shared
                        .status
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            info.name.clone(),
                            RelayStatus {
                                name: info.name.clone(),
                                addr: info.addr.clone(),
                                connected: false,
                                transport: None,
                                rtt_ms: None,
                                home: false,
                                observed: None,
                                last_error: None,
                            },
                        );
                    let (ticket, ticket_rx) = watch::channel(info.ticket.clone());
                    let (revoked, revoked_rx) = watch::channel(info.revoked.clone());
                    let task =
                        tokio::spawn(maintain(ctx.clone(), info.clone(), ticket_rx, revoked_rx));
                    running.insert(
                        info.name.clone(),
                        Running {
                            info,
                            ticket,
                            revoked,
                            task,
                        },
                    );
                }
            }
        }
        tokio::select! {
            r = list.changed() => if r.is_err() { break },
            _ = check.tick() => update_home(&ctx.shared, &home),
            // A relay came or went: at once, so that a new relay is used within a round trip.
            _ = ctx.shared.changed.notified() => update_home(&ctx.shared, &home),
            _ = shutdown.changed() => break,
        }
    }
    for (_, r) in running {
        r.task.abort();
    }
}

/// Chooses the home relay from the live connections and publishes it; refreshes status.
fn update_home(shared: &RelayShared, home: &watch::Sender<Option<String>>) {
    let rtts: Vec<(String, Duration)> = shared
        .conns()
        .iter()
        .map(|(n, c)| (n.clone(), c.rtt()))
        .collect();
    let chosen = choose_home(&rtts, home.borrow().as_deref());
    home.send_if_modified(|h| {
        if *h == chosen {
            return false;
        }
        info!(
            home = chosen.as_deref().unwrap_or("controller"),
            "home relay"
        );
        *h = chosen.clone();
        true
    });
    let mut status = shared.status.lock().unwrap_or_else(|p| p.into_inner());
    let conns = shared.conns();
    for s in status.values_mut() {
        s.home = chosen.as_deref() == Some(s.name.as_str());
        s.rtt_ms = conns.get(&s.name).map(|c| c.rtt().as_millis() as u64);
    }
}

/// The nearest relay by round-trip time, keeping `current` unless another is clearly nearer;
/// `None` (the controller's relay) when no standalone relay is connected.
fn choose_home(rtts: &[(String, Duration)], current: Option<&str>) -> Option<String> {
    let (best, best_rtt) = rtts.iter().min_by_key(|(_, rtt)| *rtt)?;
    let Some((_, current_rtt)) = rtts.iter().find(|(n, _)| Some(n.as_str()) == current) else {
        return Some(best.clone());
    };
    let clearly_better = best_rtt.as_secs_f64() < current_rtt.as_secs_f64() * HOME_HYSTERESIS
        && *current_rtt >= *best_rtt + HOME_MIN_GAIN;
    if clearly_better {
        Some(best.clone())
    } else {
        current.map(str::to_owned)
    }
}

/// Keeps one relay connected.
async fn maintain(
    ctx: RelayCtx,
    info: RelayInfo,
    mut ticket: watch::Receiver<Ticket>,
    mut revoked: watch::Receiver<Vec<Revocation>>,
) {
    let name = info.name.clone();
    let target = Target::new(&info.addr, info.tcp.as_deref(), "mesh-relay");
    let mut backoff = Duration::from_secs(1);
    let mut switched: Option<RelaySession> = None;
    loop {
        let current = ticket.borrow_and_update().clone();
        let attempt = async {
            if let Some(s) = switched.take() {
                return Ok(s);
            }
            let link = ctx
                .dialer
                .connect(&target, CONNECT_TIMEOUT)
                .await
                .map_err(|e| format!("cannot reach relay at {}: {e}", info.addr))?;
            client::admit(link, &info.key, &ctx.node_key, current, CONNECT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(session) => {
                backoff = Duration::from_secs(1);
                let transport = session.conn.transport();
                info!(relay = %name, observed = ?session.observed, %transport, rtt_ms = session.conn.rtt().as_millis() as u64, "connected to relay");
                match serve(
                    &ctx,
                    &name,
                    &target,
                    &info.key,
                    session,
                    &mut ticket,
                    &mut revoked,
                )
                .await
                {
                    Ended::Moved(next) => {
                        info!(relay = %name, from = %transport, to = %next.conn.transport(), "relay link moved to another transport");
                        switched = Some(next);
                    }
                    Ended::Lost(reason) => {
                        warn!(relay = %name, %reason, "relay connection lost; reconnecting");
                        ctx.shared.set(&name, |s| {
                            s.connected = false;
                            s.transport = None;
                            s.last_error = Some(reason);
                        });
                    }
                }
            }
            Err(e) => {
                warn!(relay = %name, error = %e, retry_in = ?backoff, "cannot use relay");
                ctx.shared.set(&name, |s| {
                    s.connected = false;
                    s.last_error = Some(e);
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// How a session ended.
enum Ended {
    /// The link failed or the relay closed it.
    Lost(String),
    /// A session on a better transport replaces it.
    Moved(RelaySession),
}

/// Runs an admitted session until it ends.
async fn serve(
    ctx: &RelayCtx,
    name: &str,
    target: &Target,
    relay_key: &mesh_proto::PublicKey,
    mut session: RelaySession,
    ticket: &mut watch::Receiver<Ticket>,
    revoked: &mut watch::Receiver<Vec<Revocation>>,
) -> Ended {
    let conn = session.conn.clone();
    ctx.shared.conns().insert(name.to_owned(), conn.clone());
    ctx.shared.changed.notify_one();
    ctx.shared.set(name, |s| {
        s.connected = true;
        s.transport = Some(conn.transport().to_string());
        s.last_error = None;
        // Over TCP the relay sees no UDP mapping; keep what QUIC showed last.
        if session.observed.is_some() {
            s.observed = session.observed;
        }
        s.rtt_ms = Some(conn.rtt().as_millis() as u64);
    });
    let _ = ctx
        .data
        .send(DataCmd::RelayRegion(name.to_owned(), Some(conn.clone())))
        .await;
    // The relay learns of removed nodes from whichever member tells it first.
    let revocations = session.revocations;
    let network = ticket.borrow().network.clone();
    let first = revoked.borrow_and_update().clone();
    if revocations && !first.is_empty() {
        let msg = RelayClientMsg::Revoke {
            network: network.clone(),
            revoked: first,
        };
        if let Err(e) = session.tx.send(&msg.encode()).await {
            return Ended::Lost(e.to_string());
        }
    }
    let better = ctx.dialer.better(target, &conn);
    tokio::pin!(better);
    // A relay that leaves the node's keepalives unanswered is gone: reconnect without
    // waiting for QUIC's idle timeout.
    let gone = conn.unanswered(mesh_control::quic::ANSWER_WITHIN);
    tokio::pin!(gone);
    let reason = loop {
        tokio::select! {
            e = conn.closed() => break Ended::Lost(e.to_string()),
            _ = &mut gone => break Ended::Lost(format!(
                "the relay left the node's packets unanswered for {:.2} s",
                mesh_control::quic::ANSWER_WITHIN.as_secs_f64()
            )),
            link = &mut better => {
                let fresh = ticket.borrow().clone();
                match client::admit(link, relay_key, &ctx.node_key, fresh, CONNECT_TIMEOUT).await {
                    Ok(next) => break Ended::Moved(next),
                    Err(e) => {
                        warn!(relay = %name, error = %e, "the other transport connected but the relay did not admit the node; staying");
                        better.set(ctx.dialer.better(target, &conn));
                    }
                }
            }
            r = revoked.changed() => {
                if r.is_err() {
                    break Ended::Lost("stopped".to_owned());
                }
                let list = revoked.borrow_and_update().clone();
                if revocations && !list.is_empty() {
                    debug!(relay = %name, count = list.len(), "forwarding revocations");
                    let msg = RelayClientMsg::Revoke { network: network.clone(), revoked: list };
                    if let Err(e) = session.tx.send(&msg.encode()).await {
                        break Ended::Lost(e.to_string());
                    }
                }
            }
            r = ticket.changed() => {
                if r.is_err() {
                    break Ended::Lost("stopped".to_owned());
                }
                let fresh = ticket.borrow_and_update().clone();
                let msg = RelayClientMsg::Renew { ticket: fresh };
                if let Err(e) = session.tx.send(&msg.encode()).await {
                    break Ended::Lost(e.to_string());
                }
            }
            msg = session.rx.recv() => match msg.map(|b: Vec<u8>| RelayServerMsg::decode(&b)) {
                Ok(Ok(RelayServerMsg::Welcome { expires, .. })) => {
                    debug!(relay = %name, expires, "relay ticket renewed");
                }
                Ok(Ok(RelayServerMsg::Error { message, .. })) => break Ended::Lost(format!("relay refused: {message}")),
                Ok(Err(e)) => break Ended::Lost(format!("malformed message from relay: {e}")),
                Err(e) => break Ended::Lost(e.to_string()),
            },
        }
    };
    {
        let mut conns = ctx.shared.conns();
        if conns.get(name).is_some_and(|c| c.id() == conn.id()) {
            conns.remove(name);
        }
    }
    ctx.shared.changed.notify_one();
    if matches!(reason, Ended::Moved(_)) {
        // The next session hands the data plane its link at once.
        conn.close(0, b"moved to another transport");
    } else {
        // Closed already, or unanswered: then it must not linger until QUIC gives up on it.
        conn.close(0, b"lost");
        let _ = ctx
            .data
            .send(DataCmd::RelayRegion(name.to_owned(), None))
            .await;
    }
    reason
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mesh_proto::PublicKey;

    fn keypair(seed: u8) -> ([u8; 32], PublicKey) {
        let secret = [seed; 32];
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret));
        (secret, PublicKey(public.to_bytes()))
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// A member's relay task carries the controller's revocations to the relay, which then
    /// disconnects the removed node.
    #[tokio::test]
    async fn revocations_from_the_controller_reach_the_relay() {
        let (controller, controller_pub) = keypair(1);
        let (relay_secret, relay_key) = keypair(2);
        let relay = mesh_relay::server::Relay::bind(
            "127.0.0.1:0".parse().unwrap(),
            relay_secret,
            &controller_pub,
        )
        .unwrap();
        let addr = relay.local_addr().unwrap();
        let forwarder = relay.forwarder();
        tokio::spawn(relay.run(std::future::pending()));
        let issuer = mesh_relay::TicketKey::new(&controller, &relay_key);
        let expires = unix_now() + 3600;

        // The node that will be removed, connected by hand.
        let (victim_secret, victim) = keypair(3);
        let victim_ep = mesh_control::quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap();
        let v = client::connect(
            &victim_ep,
            addr,
            &relay_key,
            &victim_secret,
            issuer.issue("prod", &victim, expires),
            CONNECT_TIMEOUT,
        )
        .await
        .unwrap();

        // A member runs the relay task as the agent does.
        let (member_secret, member) = keypair(4);
        let (data, mut data_rx) = mpsc::channel(16);
        tokio::spawn(async move { while data_rx.recv().await.is_some() {} });
        let ctx = RelayCtx {
            dialer: Dialer {
                endpoint: mesh_control::quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap(),
                mark: None,
                proxy: Default::default(),
                interface: "mesh-test0".into(),
                overlay: None,
                tcp_first: Default::default(),
                lossy: Default::default(),
            },
            node_key: member_secret,
            data,
            shared: RelayShared::default(),
        };
        let info = RelayInfo {
            name: "eu-1".into(),
            addr: addr.to_string(),
            tcp: None,
            key: relay_key,
            ticket: issuer.issue("prod", &member, expires),
            revoked: vec![],
        };
        let (list_tx, list) = watch::channel(vec![info.clone()]);
        let (home, _home_rx) = watch::channel(None);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(run(ctx.clone(), list, home, shutdown));
        let t = std::time::Instant::now();
        while !forwarder.is_connected("prod", &member) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "member never connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The controller pushes the relay list again, now with a revocation.
        let mut with_revocation = info;
        with_revocation.revoked = vec![issuer.revoke("prod", &victim, expires)];
        list_tx.send_replace(vec![with_revocation]);
        tokio::time::timeout(Duration::from_secs(5), v.conn.closed())
            .await
            .expect("the removed node is disconnected");
        assert!(!forwarder.is_connected("prod", &victim));
        assert!(forwarder.is_connected("prod", &member), "the member stays");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn home_is_the_nearest_with_hysteresis() {
        let rtts = vec![("far".to_owned(), ms(80)), ("near".to_owned(), ms(12))];
        assert_eq!(choose_home(&rtts, None).as_deref(), Some("near"));
        // A gone home is replaced.
        assert_eq!(choose_home(&rtts, Some("gone")).as_deref(), Some("near"));
        // Jitter does not move the home...
        let rtts = vec![("a".to_owned(), ms(10)), ("b".to_owned(), ms(9))];
        assert_eq!(choose_home(&rtts, Some("a")).as_deref(), Some("a"));
        // ...a clearly nearer relay does.
        let rtts = vec![("a".to_owned(), ms(40)), ("b".to_owned(), ms(9))];
        assert_eq!(choose_home(&rtts, Some("a")).as_deref(), Some("b"));
        // Sub-millisecond differences on a LAN never count.
        let rtts = vec![("a".to_owned(), ms(2)), ("b".to_owned(), ms(0))];
        assert_eq!(choose_home(&rtts, Some("a")).as_deref(), Some("a"));
        // No standalone relay: the controller's.
        assert_eq!(choose_home(&[], Some("a")), None);
    }
}
