//! The node's side of a standalone relay: prove the key on a link (QUIC or TCP), show the
//! ticket.

use mesh_control::channel::{self, ChannelError};
use mesh_control::Link;
use mesh_proto::control::{ErrorCode, Ticket};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_proto::PublicKey;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a relay did not admit the node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection within the timeout, or it failed.
    #[error("cannot reach relay at {addr}: {reason}")]
    Unreachable {
        /// Relay address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The relay did not prove the key the controller announced.
    #[error("relay at {addr} did not prove its key (Noise handshake refused); the controller's relay list may be out of date")]
    KeyMismatch {
        /// Relay address.
        addr: SocketAddr,
    },
    /// The relay refused the ticket or the request.
    #[error("relay at {addr} refused: {message} ({code:?})")]
    Refused {
        /// Relay address.
        addr: SocketAddr,
        /// Reason code.
        code: ErrorCode,
        /// Reason text.
        message: String,
    },
}

/// An admitted session at a relay.
pub struct RelaySession {
    /// The link; relayed frames are its datagrams.
    pub conn: Link,
    /// Channel for renewals.
    pub tx: channel::Sender,
    /// Channel for the relay's answers.
    pub rx: channel::Receiver,
    /// The node's UDP mapping as the relay saw it (`None` over TCP, where the relay sees a TCP
    /// source, which is no endpoint candidate).
    pub observed: Option<SocketAddr>,
    /// Unix seconds until which the relay admits the node.
    pub expires: u64,
    /// The relay accepts forwarded revocations (`RelayClientMsg::Revoke`).
    pub revocations: bool,
}

/// Connects to the relay at `addr` over QUIC, pins `relay_key`, proves `node_private`, shows
/// `ticket`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    relay_key: &PublicKey,
    node_private: &[u8; 32],
    ticket: Ticket,
    timeout: Duration,
) -> Result<RelaySession, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
    let dial = async {
        endpoint
            .connect(addr, "mesh-relay")
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))
    };
    let conn = tokio::time::timeout(timeout, dial)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no answer within {timeout:?}"))))?;
    admit(Link::Quic(conn), relay_key, node_private, ticket, timeout).await
}

/// Proves `node_private` to the relay on `conn` (either transport), pinning `relay_key`, and
/// shows `ticket`.
pub async fn admit(
    conn: Link,
    relay_key: &PublicKey,
    node_private: &[u8; 32],
    ticket: Ticket,
    timeout: Duration,
) -> Result<RelaySession, ClientError> {
    let addr = conn.remote_address();
    let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
    let attempt = async {
        let (mut tx, mut rx) = channel::initiate(&conn, node_private, relay_key)
            .await
            .map_err(|e| match e {
                ChannelError::KeyMismatch => ClientError::KeyMismatch { addr },
                e => unreachable(e.to_string()),
            })?;
        tx.send(&RelayClientMsg::Hello { ticket }.encode())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let reply = rx.recv().await.map_err(|e| unreachable(e.to_string()))?;
        match RelayServerMsg::decode(&reply).map_err(|e| unreachable(e.to_string()))? {
            RelayServerMsg::Welcome {
                observed,
                expires,
                revocations,
            } => Ok(RelaySession {
                observed: conn.observed_udp().map(|_| observed),
                conn,
                tx,
                rx,
                expires,
                revocations,
            }),
            RelayServerMsg::Error { code, message } => {
                conn.close(0, b"refused");
                Err(ClientError::Refused {
                    addr,
                    code,
                    message,
                })
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("no answer within {timeout:?}"))))
}
