//! The standalone relay (`mesh-controller relay`): a QUIC endpoint that admits nodes by Noise
//! handshake plus controller ticket, and forwards their frames.

use crate::forward::Forwarder;
use crate::ticket::{TicketError, TicketKey};
use anyhow::Context as _;
use mesh_control::{channel, quic};
use mesh_proto::control::{ErrorCode, Ticket};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_proto::PublicKey;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, Instrument};

/// Time a node has to finish the handshake and show its ticket.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);
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
    secret: [u8; 32],
    tickets: TicketKey,
    forwarder: Arc<Forwarder>,
}

impl Relay {
    /// Binds `listen` with the relay's private key, admitting nodes with tickets from the
    /// controller whose public key is `controller`.
    pub fn bind(
        listen: SocketAddr,
        secret: [u8; 32],
        controller: &PublicKey,
    ) -> anyhow::Result<Relay> {
        // Stable reset keys: after a restart, nodes learn at once that their connection is gone
        // and reconnect, instead of waiting for the idle timeout.
        let endpoint = quic::bind_server(listen, &secret)?;
        Ok(Relay {
            endpoint,
            tickets: TicketKey::new(&secret, controller),
            secret,
            forwarder: Forwarder::new(),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The forwarding table, for counters.
    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.forwarder.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = Arc::new((self.secret, self.tickets, self.forwarder));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = admit(incoming, &shared.0, &shared.1, &shared.2).await {
                            debug!(error = %format!("{e:#}"), "connection ended");
                        }
                    }.instrument(tracing::info_span!("node", %remote)));
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

async fn refuse(tx: &mut channel::Sender, conn: &quinn::Connection, msg: RelayServerMsg) {
    info!(?msg, "refused");
    let _ = tx.send(&msg.encode()).await;
    tx.finish();
    // Let the node read the reason before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
}

async fn admit(
    incoming: quinn::Incoming,
    secret: &[u8; 32],
    tickets: &TicketKey,
    forwarder: &Arc<Forwarder>,
) -> anyhow::Result<()> {
    let conn = incoming.await?;
    let (mut tx, mut rx, key, ticket) = tokio::time::timeout(ADMISSION_TIMEOUT, async {
        let (tx, mut rx, key) = channel::accept(&conn, secret).await?;
        let first = rx.recv().await?;
        anyhow::Ok((tx, rx, key, RelayClientMsg::decode(&first)))
    })
    .await
    .context("admission timed out")??;
    let ticket: Ticket = match ticket {
        Ok(RelayClientMsg::Hello { ticket }) => ticket,
        Ok(RelayClientMsg::Renew { .. }) => {
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
    let network = ticket.network;
    let mut expires = ticket.expires;
    let welcome = |expires| RelayServerMsg::Welcome {
        observed: conn.remote_address(),
        expires,
    };
    tx.send(&welcome(expires).encode()).await?;
    info!(%network, node = %key, "node admitted");
    let forwarding = forwarder.serve(&network, key, conn.clone());
    tokio::pin!(forwarding);
    loop {
        let left = Duration::from_secs(expires.saturating_sub(unix_now()));
        tokio::select! {
            _ = &mut forwarding => break,
            _ = tokio::time::sleep(left) => {
                info!(node = %key, "ticket expired without renewal; closing");
                conn.close(CLOSE_TICKET_EXPIRED.into(), b"ticket expired");
                break;
            }
            msg = rx.recv() => {
                let Ok(bytes) = msg else { break };
                match RelayClientMsg::decode(&bytes) {
                    Ok(RelayClientMsg::Renew { ticket }) if ticket.network == network => {
                        match tickets.verify(&ticket, &key, unix_now()) {
                            Ok(()) => {
                                expires = expires.max(ticket.expires);
                                tx.send(&welcome(expires).encode()).await?;
                            }
                            Err(e) => {
                                refuse(&mut tx, &conn, refusal(&e)).await;
                                break;
                            }
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
