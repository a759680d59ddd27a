//! The standalone relay (`mesh-controller relay`): a QUIC endpoint, and optionally a TCP
//! listener ([`mesh_control::tcp`]) for nodes whose UDP is blocked, that admits nodes by Noise
//! handshake plus controller ticket, and forwards their frames.

use crate::forward::Forwarder;
use crate::ticket::{Revocations, TicketError, TicketKey};
use anyhow::Context as _;
use mesh_control::quic::{Gate, ServerLimits, Slot};
use mesh_control::{channel, quic, tcp, Link};
use mesh_proto::control::{ErrorCode, Ticket};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_proto::PublicKey;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn, Instrument};

/// Time a node has to finish the handshake and show its ticket.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message an admitted node may send (a renewal, or a list of revocations).
const MAX_ADMITTED_MESSAGE: usize = 64 * 1024;
/// QUIC close code when the ticket ran out without renewal.
pub const CLOSE_TICKET_EXPIRED: u32 = 0x4d02;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A bound relay, ready to run.
pub struct Relay {
    endpoint: quinn::Endpoint,
    tcp: Option<tcp::Listener>,
    shared: Arc<Shared>,
}

/// What every connection task of a relay uses.
struct Shared {
    secret: [u8; 32],
    tickets: TicketKey,
    forwarder: Arc<Forwarder>,
    gate: Arc<Gate>,
    revocations: Mutex<Revocations>,
    /// Revocations that did not verify (another relay's, forged, or for another network).
    bad_revocations: AtomicU64,
}

impl Shared {
    fn revocations(&self) -> std::sync::MutexGuard<'_, Revocations> {
        self.revocations.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Relay {
    /// Binds `listen` with the relay's private key, admitting nodes with tickets from the
    /// controller whose public key is `controller`, with the default [`ServerLimits`].
    pub fn bind(
        listen: SocketAddr,
        secret: [u8; 32],
        controller: &PublicKey,
    ) -> anyhow::Result<Relay> {
        Relay::bind_with(listen, secret, controller, ServerLimits::default())
    }

    /// [`Relay::bind`] with explicit connection limits.
    pub fn bind_with(
        listen: SocketAddr,
        secret: [u8; 32],
        controller: &PublicKey,
        limits: ServerLimits,
    ) -> anyhow::Result<Relay> {
        // Stable reset keys: after a restart, nodes learn at once that their connection is gone
        // and reconnect, instead of waiting for the idle timeout.
        let endpoint = quic::bind_server(listen, &secret)?;
        Ok(Relay {
            endpoint,
            tcp: None,
            shared: Arc::new(Shared {
                tickets: TicketKey::new(&secret, controller),
                secret,
                forwarder: Forwarder::new(),
                gate: Gate::new(limits),
                revocations: Mutex::new(Revocations::default()),
                bad_revocations: AtomicU64::new(0),
            }),
        })
    }

    /// Connection counters (open, refused, retried).
    pub fn gate(&self) -> Arc<Gate> {
        self.shared.gate.clone()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Also listens on TCP at `listen` (TLS after an HTTP upgrade) for nodes whose UDP does
    /// not get through. Returns the address bound.
    pub fn listen_tcp(&mut self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tcp::Listener::bind(listen)?;
        let bound = listener.local_addr()?;
        self.tcp = Some(listener);
        Ok(bound)
    }

    /// The forwarding table, for counters.
    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.shared.forwarder.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let Some((incoming, slot)) = shared.gate.admit(incoming) else { continue };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let r = async { admit(Link::Quic(incoming.await?), slot, &shared).await };
                        if let Err(e) = r.await {
                            debug!(error = %format!("{e:#}"), "connection ended");
                        }
                    }.instrument(tracing::info_span!("node", %remote, transport = "quic")));
                }
                attempt = accept_tcp(self.tcp.as_ref(), &shared.gate) => {
                    let Some(attempt) = attempt else { continue };
                    let (remote, shared) = (attempt.remote, shared.clone());
                    tokio::spawn(async move {
                        let r = async {
                            let (link, slot) = attempt.upgrade().await?;
                            admit(link, slot, &shared).await
                        };
                        if let Err(e) = r.await {
                            debug!(error = %format!("{e:#}"), "connection ended");
                        }
                    }.instrument(tracing::info_span!("node", %remote, transport = "tcp")));
                }
                _ = &mut shutdown => break,
            }
        }
        self.endpoint.close(0u32.into(), b"relay shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn refusal(e: &TicketError) -> RelayServerMsg {
    RelayServerMsg::Error {
        code: match e {
            TicketError::Invalid => ErrorCode::TicketInvalid,
            TicketError::Expired(_) => ErrorCode::TicketExpired,
        },
        message: e.to_string(),
    }
}

/// An accepted TCP connection that the gate admitted, not yet upgraded.
pub struct TcpAttempt {
    /// Where it comes from.
    pub remote: SocketAddr,
    stream: tokio::net::TcpStream,
    slot: Slot,
    upgrader: tcp::Upgrader,
}

impl TcpAttempt {
    /// TLS and the HTTP upgrade (bounded in time); the link with its place in the gate.
    pub async fn upgrade(self) -> Result<(Link, Slot), tcp::TcpError> {
        let link = self.upgrader.upgrade(self.stream, self.remote).await?;
        Ok((Link::Tcp(link), self.slot))
    }
}

/// The next TCP connection the gate admits (`None`: one it refused, or an accept error, which
/// is logged), or never when the server does not listen on TCP. For the controller and the
/// standalone relay alike.
pub async fn accept_tcp(listener: Option<&tcp::Listener>, gate: &Arc<Gate>) -> Option<TcpAttempt> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    match listener.accept().await {
        Ok((stream, remote)) => Some(TcpAttempt {
            remote,
            stream,
            slot: gate.admit_tcp(remote)?,
            upgrader: listener.upgrader(),
        }),
        Err(e) => {
            // Out of file descriptors and the like: do not spin.
            warn!(error = %e, "cannot accept a TCP connection");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

async fn refuse(tx: &mut channel::Sender, conn: &Link, msg: RelayServerMsg) {
    info!(?msg, "refused");
    let _ = tx.send(&msg.encode()).await;
    tx.finish();
    // Let the node read the reason before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
}

fn revoked_refusal() -> RelayServerMsg {
    RelayServerMsg::Error {
        code: ErrorCode::TicketInvalid,
        message: "relay ticket revoked: this node was removed from its network; join again (`mesh join <token>`) to get new tickets".into(),
    }
}

/// Verifies and applies revocations a node forwarded; returns how many connections closed.
fn apply_revocations(
    shared: &Shared,
    network: &str,
    revoked: &[mesh_proto::control::Revocation],
) -> usize {
    let now = unix_now();
    let mut closed = 0;
    for r in revoked {
        if !shared.tickets.verify_revocation(network, r) {
            shared.bad_revocations.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if shared.revocations().insert(network, &r.key, r.expires, now) {
            info!(%network, node = %r.key, "revocation accepted");
        }
        if shared.forwarder.revoke(network, &r.key, r.expires) {
            info!(%network, node = %r.key, "revoked node disconnected");
            closed += 1;
        }
    }
    closed
}

async fn admit(conn: Link, mut slot: Slot, shared: &Shared) -> anyhow::Result<()> {
    let (secret, tickets, forwarder) = (&shared.secret, &shared.tickets, &shared.forwarder);
    let (mut tx, mut rx, key, ticket) = tokio::time::timeout(ADMISSION_TIMEOUT, async {
        let (tx, mut rx, key) = channel::accept(&conn, secret).await?;
        let first = rx.recv().await?;
        anyhow::Ok((tx, rx, key, RelayClientMsg::decode(&first)))
    })
    .await
    .context("admission timed out")??;
    let ticket: Ticket = match ticket {
        Ok(RelayClientMsg::Hello { ticket }) => ticket,
        Ok(RelayClientMsg::Renew { .. } | RelayClientMsg::Revoke { .. }) => {
            let message = "the first message must be hello".to_owned();
            let code = ErrorCode::BadRequest;
            refuse(&mut tx, &conn, RelayServerMsg::Error { code, message }).await;
            return Ok(());
        }
        Err(e) => {
            let message = format!("malformed message: {e}");
            let code = ErrorCode::BadRequest;
            refuse(&mut tx, &conn, RelayServerMsg::Error { code, message }).await;
            return Ok(());
        }
    };
    if let Err(e) = tickets.verify(&ticket, &key, unix_now()) {
        refuse(&mut tx, &conn, refusal(&e)).await;
        return Ok(());
    }
    if shared
        .revocations()
        .voids(&ticket.network, &key, ticket.expires)
    {
        refuse(&mut tx, &conn, revoked_refusal()).await;
        return Ok(());
    }
    let network = ticket.network;
    let mut expires = ticket.expires;
    let welcome = |expires| RelayServerMsg::Welcome {
        observed: conn.remote_address(),
        expires,
        revocations: true,
    };
    tx.send(&welcome(expires).encode()).await?;
    slot.established();
    rx.set_limit(MAX_ADMITTED_MESSAGE);
    info!(%network, node = %key, "node admitted");
    let attachment = forwarder.attach(&network, key, conn.clone(), expires);
    let forwarding = attachment.forward();
    tokio::pin!(forwarding);
    loop {
        let left = Duration::from_secs(expires.saturating_sub(unix_now()));
        tokio::select! {
            _ = &mut forwarding => break,
            _ = tokio::time::sleep(left) => {
                info!(node = %key, "ticket expired without renewal; closing");
                conn.close(CLOSE_TICKET_EXPIRED, b"ticket expired");
                break;
            }
            msg = rx.recv() => {
                let Ok(bytes) = msg else { break };
                match RelayClientMsg::decode(&bytes) {
                    Ok(RelayClientMsg::Renew { ticket }) if ticket.network == network => {
                        match tickets.verify(&ticket, &key, unix_now()) {
                            Ok(()) if shared.revocations().voids(&network, &key, ticket.expires) => {
                                refuse(&mut tx, &conn, revoked_refusal()).await;
                                break;
                            }
                            Ok(()) => {
                                expires = expires.max(ticket.expires);
                                attachment.set_expires(expires);
                                tx.send(&welcome(expires).encode()).await?;
                            }
                            Err(e) => {
                                refuse(&mut tx, &conn, refusal(&e)).await;
                                break;
                            }
                        }
                    }
                    Ok(RelayClientMsg::Revoke { network: net, revoked }) => {
                        let before = shared.bad_revocations.load(Ordering::Relaxed);
                        apply_revocations(shared, &net, &revoked);
                        let bad = shared.bad_revocations.load(Ordering::Relaxed) - before;
                        if bad > 0 {
                            // Not fatal: a node may carry a list made for this relay's old key.
                            warn!(node = %key, bad, "revocations that do not verify were ignored");
                        }
                    }
                    other => {
                        let message = format!("unexpected message: {other:?}");
                        let code = ErrorCode::BadRequest;
                        refuse(&mut tx, &conn, RelayServerMsg::Error { code, message }).await;
                        break;
                    }
                }
            }
        }
    }
    debug!(node = %key, "node gone");
    Ok(())
}
