//! A Noise IK channel over a [`Link`]: inside the first bidirectional QUIC stream of a QUIC
//! link, or as the control frames of a TCP link ([`crate::tcp`]).
//!
//! Wire: on QUIC every Noise message is framed as `[u16 big-endian length][message]`; on TCP
//! each is one control frame. After the two
//! handshake messages, an application message of up to
//! [`mesh_proto::control::MAX_MESSAGE_LEN`] bytes is split into chunks; each chunk's plaintext
//! is `[flag][data]`, flag 1 on the last chunk of a message and 0 otherwise.
//!
//! The responder (controller or relay) reads at most [`MAX_UNADMITTED_LEN`] bytes per message
//! until it calls [`Receiver::set_limit`] after admitting the peer, so a stranger cannot make it
//! buffer a 1 MiB message before proving anything. A message over the limit closes the
//! connection with [`CLOSE_MESSAGE_TOO_LARGE`].

use crate::link::{Link, LinkClosed};
use crate::tcp::TcpLink;
use mesh_proto::control::MAX_MESSAGE_LEN;
use mesh_proto::PublicKey;
use std::sync::{Arc, Mutex};

/// The Noise protocol used.
pub const NOISE_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Application close code sent by the responder when the initiator's first message does
/// not decrypt: the initiator expected another responder key.
pub const CLOSE_HANDSHAKE_FAILED: u32 = 0x4d01;
/// Application close code sent by a receiver when a message exceeds its current limit.
pub const CLOSE_MESSAGE_TOO_LARGE: u32 = 0x4d03;
/// Largest message a responder reads before it admits the peer (join, hello, a relay ticket:
/// a few hundred bytes each).
pub const MAX_UNADMITTED_LEN: usize = 4096;
/// Largest Noise handshake message accepted (IK message 1 with an empty payload is 96 bytes).
const MAX_HANDSHAKE_FRAME: usize = 1024;
/// Prologue label (followed by keying material exported from the QUIC session).
const PROLOGUE_LABEL: &[u8] = b"mesh-control/1";
/// Label of the keying material exported from the QUIC or TLS session into the prologue.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-mesh-noise-prologue";
const MAX_NOISE_MSG: usize = 65535;
const TAG_LEN: usize = 16;
const CHUNK: usize = MAX_NOISE_MSG - TAG_LEN - 1;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The responder could not decrypt our handshake: its key is not the one we pinned.
    #[error("the controller did not prove the key in the token (Noise handshake refused)")]
    KeyMismatch,
    /// The handshake from the other side did not authenticate.
    #[error("Noise handshake failed: {0}")]
    Handshake(String),
    /// The link failed or was closed.
    #[error("connection lost: {0}")]
    Connection(#[from] LinkClosed),
    /// The peer closed the stream cleanly.
    #[error("channel closed by the other side")]
    Closed,
    /// A message broke the framing or exceeded its bound.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message (or a handshake message) is larger than the receiver accepts now; the
    /// connection was closed.
    #[error("message of at least {len} bytes exceeds the limit of {limit} bytes (before admission only join, hello or a relay ticket may be sent); connection closed")]
    TooLarge {
        /// Bytes announced or received so far.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
}

fn noise_err(e: snow::Error) -> ChannelError {
    ChannelError::Handshake(e.to_string())
}

fn read_err(e: quinn::ReadExactError) -> ChannelError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => ChannelError::Closed,
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            ChannelError::Connection(c.into())
        }
        quinn::ReadExactError::ReadError(e) => ChannelError::Protocol(e.to_string()),
    }
}

fn write_err(e: quinn::WriteError) -> ChannelError {
    match e {
        quinn::WriteError::ConnectionLost(c) => ChannelError::Connection(c.into()),
        e => ChannelError::Protocol(e.to_string()),
    }
}

fn prologue(link: &Link) -> Result<Vec<u8>, ChannelError> {
    let mut exported = [0u8; 32];
    match link {
        Link::Quic(conn) => conn
            .export_keying_material(&mut exported, EXPORTER_LABEL, b"")
            .map_err(|_| ChannelError::Protocol("cannot export QUIC keying material".into()))?,
        Link::Tcp(tcp) => exported = tcp.exporter(),
    }
    let mut p = PROLOGUE_LABEL.to_vec();
    p.extend_from_slice(&exported);
    Ok(p)
}

/// The sending side of the channel's byte pipe.
enum FrameTx {
    Quic(quinn::SendStream),
    Tcp(TcpLink),
}

/// The receiving side.
enum FrameRx {
    Quic(quinn::RecvStream),
    Tcp(TcpLink),
}

impl FrameTx {
    async fn open(link: &Link) -> Result<(FrameTx, FrameRx), ChannelError> {
        Ok(match link {
            Link::Quic(conn) => {
                let (send, recv) = conn.open_bi().await.map_err(LinkClosed::from)?;
                (FrameTx::Quic(send), FrameRx::Quic(recv))
            }
            Link::Tcp(t) => (FrameTx::Tcp(t.clone()), FrameRx::Tcp(t.clone())),
        })
    }

    async fn accept(link: &Link) -> Result<(FrameTx, FrameRx), ChannelError> {
        Ok(match link {
            Link::Quic(conn) => {
                let (send, recv) = conn.accept_bi().await.map_err(LinkClosed::from)?;
                (FrameTx::Quic(send), FrameRx::Quic(recv))
            }
            Link::Tcp(t) => (FrameTx::Tcp(t.clone()), FrameRx::Tcp(t.clone())),
        })
    }

    async fn write_frame(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        let len = u16::try_from(msg.len())
            .map_err(|_| ChannelError::Protocol("noise message over 65535 bytes".into()))?;
        match self {
            FrameTx::Quic(send) => {
                let mut framed = Vec::with_capacity(2 + msg.len());
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(msg);
                send.write_all(&framed).await.map_err(write_err)
            }
            FrameTx::Tcp(t) => Ok(t.send_control(msg.to_vec().into()).await?),
        }
    }

    fn finish(&mut self) {
        match self {
            FrameTx::Quic(send) => {
                let _ = send.finish();
            }
            // The link closes after its owner's last message; nothing to finish.
            FrameTx::Tcp(_) => {}
        }
    }
}

impl FrameRx {
    /// Reads one frame of at most `max` bytes; a larger one is refused before its body is
    /// read (on TCP, before it is decrypted).
    async fn read_frame(&mut self, max: usize) -> Result<Vec<u8>, ChannelError> {
        match self {
            FrameRx::Quic(recv) => {
                let mut len = [0u8; 2];
                recv.read_exact(&mut len).await.map_err(read_err)?;
                let len = usize::from(u16::from_be_bytes(len));
                if len > max {
                    return Err(ChannelError::TooLarge { len, limit: max });
                }
                let mut msg = vec![0u8; len];
                recv.read_exact(&mut msg).await.map_err(read_err)?;
                Ok(msg)
            }
            FrameRx::Tcp(t) => {
                let frame = t.recv_control().await?;
                if frame.len() > max {
                    return Err(ChannelError::TooLarge {
                        len: frame.len(),
                        limit: max,
                    });
                }
                Ok(frame.to_vec())
            }
        }
    }
}

fn builder_params() -> Result<snow::params::NoiseParams, ChannelError> {
    NOISE_PATTERN
        .parse()
        .map_err(|e: snow::Error| ChannelError::Handshake(e.to_string()))
}

/// Opens the channel as the node: proves `local_private` and requires the controller to prove
/// `remote`.
pub async fn initiate(
    conn: &Link,
    local_private: &[u8; 32],
    remote: &PublicKey,
) -> Result<(Sender, Receiver), ChannelError> {
    let prologue = prologue(conn)?;
    let mut hs = snow::Builder::new(builder_params()?)
        .local_private_key(local_private)
        .and_then(|b| b.remote_public_key(&remote.0))
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_initiator())
        .map_err(noise_err)?;
    let (mut send, mut recv) = FrameTx::open(conn).await?;
    let mut buf = vec![0u8; MAX_NOISE_MSG];
    let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
    send.write_frame(&buf[..n]).await?;
    let reply = match recv.read_frame(MAX_HANDSHAKE_FRAME).await {
        Ok(r) => r,
        Err(ChannelError::Connection(LinkClosed {
            code: Some(CLOSE_HANDSHAKE_FAILED),
            ..
        })) => return Err(ChannelError::KeyMismatch),
        Err(e) => return Err(e),
    };
    hs.read_message(&reply, &mut buf)
        .map_err(|_| ChannelError::KeyMismatch)?;
    let transport = hs.into_transport_mode().map_err(noise_err)?;
    Ok(split(conn, send, recv, transport, MAX_MESSAGE_LEN))
}

/// Closes `conn` with [`CLOSE_MESSAGE_TOO_LARGE`] when `e` is [`ChannelError::TooLarge`].
fn close_if_too_large(conn: &Link, e: &ChannelError) {
    if let ChannelError::TooLarge { len, limit } = e {
        conn.close(
            CLOSE_MESSAGE_TOO_LARGE,
            format!("message of {len} bytes over the limit of {limit}").as_bytes(),
        );
    }
}

/// Accepts the channel as the controller or a relay. Returns the node's proven key. The
/// receiver accepts messages of at most [`MAX_UNADMITTED_LEN`] bytes until
/// [`Receiver::set_limit`] raises the limit.
pub async fn accept(
    conn: &Link,
    local_private: &[u8; 32],
) -> Result<(Sender, Receiver, PublicKey), ChannelError> {
    let prologue = prologue(conn)?;
    let (mut send, mut recv) = FrameTx::accept(conn).await?;
    let first = recv
        .read_frame(MAX_HANDSHAKE_FRAME)
        .await
        .inspect_err(|e| close_if_too_large(conn, e))?;
    let mut hs = snow::Builder::new(builder_params()?)
        .local_private_key(local_private)
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .map_err(noise_err)?;
    let mut buf = vec![0u8; MAX_NOISE_MSG];
    if hs.read_message(&first, &mut buf).is_err() {
        conn.close(
            CLOSE_HANDSHAKE_FAILED,
            b"noise handshake failed: the node expects another controller key",
        );
        return Err(ChannelError::Handshake(
            "initiator expects another controller key".into(),
        ));
    }
    let remote: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| ChannelError::Handshake("no remote static key".into()))?;
    let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
    send.write_frame(&buf[..n]).await?;
    let transport = hs.into_transport_mode().map_err(noise_err)?;
    let (tx, rx) = split(conn, send, recv, transport, MAX_UNADMITTED_LEN);
    Ok((tx, rx, PublicKey(remote)))
}

fn split(
    conn: &Link,
    send: FrameTx,
    recv: FrameRx,
    transport: snow::TransportState,
    limit: usize,
) -> (Sender, Receiver) {
    let state = Arc::new(Mutex::new(transport));
    (
        Sender {
            send,
            state: state.clone(),
        },
        Receiver {
            conn: conn.clone(),
            recv,
            state,
            limit,
        },
    )
}

fn lock(
    state: &Mutex<snow::TransportState>,
) -> Result<std::sync::MutexGuard<'_, snow::TransportState>, ChannelError> {
    state
        .lock()
        .map_err(|_| ChannelError::Protocol("noise state lock poisoned".into()))
}

/// Sending half of the channel. It holds no buffer between messages: a controller keeps a
/// channel per connected (or waiting) node, and 64 KiB each way per node would make a flood of
/// join requests cost the controller 128 KiB a connection.
pub struct Sender {
    send: FrameTx,
    state: Arc<Mutex<snow::TransportState>>,
}

impl Sender {
    /// Sends one message (at most `MAX_MESSAGE_LEN` bytes).
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), ChannelError> {
        if msg.len() > MAX_MESSAGE_LEN {
            return Err(ChannelError::Protocol(format!(
                "message of {} bytes over the limit",
                msg.len()
            )));
        }
        let mut chunks = msg.chunks(CHUNK).peekable();
        if msg.is_empty() {
            return self.send_chunk(&[], true).await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send_chunk(chunk, last).await?;
        }
        Ok(())
    }

    async fn send_chunk(&mut self, data: &[u8], last: bool) -> Result<(), ChannelError> {
        let mut plain = Vec::with_capacity(data.len() + 1);
        plain.push(u8::from(last));
        plain.extend_from_slice(data);
        let mut sealed = vec![0u8; plain.len() + TAG_LEN];
        let n = lock(&self.state)?
            .write_message(&plain, &mut sealed)
            .map_err(noise_err)?;
        self.send.write_frame(&sealed[..n]).await
    }

    /// Finishes the stream (the peer's `recv` returns `Closed` after pending messages).
    pub fn finish(&mut self) {
        self.send.finish();
    }
}

/// Receiving half of the channel (no buffer between messages either; see [`Sender`]).
pub struct Receiver {
    conn: Link,
    recv: FrameRx,
    state: Arc<Mutex<snow::TransportState>>,
    limit: usize,
}

impl Receiver {
    /// Sets the largest message accepted from now on (at most `MAX_MESSAGE_LEN`): a server
    /// raises it once the peer is admitted.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_MESSAGE_LEN);
    }

    /// Receives one whole message. Cancel-safe only between messages; use it from one task. A
    /// message over the limit closes the connection ([`CLOSE_MESSAGE_TOO_LARGE`]).
    pub async fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let r = self.recv_inner().await;
        if let Err(e) = &r {
            close_if_too_large(&self.conn, e);
        }
        r
    }

    async fn recv_inner(&mut self) -> Result<Vec<u8>, ChannelError> {
        let mut msg = Vec::new();
        loop {
            // A chunk's ciphertext is its data plus the flag byte and the tag.
            let max_frame = (self.limit.saturating_sub(msg.len()) + 1 + TAG_LEN).min(MAX_NOISE_MSG);
            let frame = self.recv.read_frame(max_frame).await.map_err(|e| match e {
                ChannelError::TooLarge { len, .. } => ChannelError::TooLarge {
                    len: msg.len() + len.saturating_sub(1 + TAG_LEN),
                    limit: self.limit,
                },
                e => e,
            })?;
            let mut opened = vec![0u8; frame.len()];
            let n = lock(&self.state)?
                .read_message(&frame, &mut opened)
                .map_err(|e| ChannelError::Protocol(format!("undecryptable chunk: {e}")))?;
            let Some((&flag, data)) = opened[..n].split_first() else {
                return Err(ChannelError::Protocol("empty chunk".into()));
            };
            if msg.len() + data.len() > self.limit {
                return Err(ChannelError::TooLarge {
                    len: msg.len() + data.len(),
                    limit: self.limit,
                });
            }
            msg.extend_from_slice(data);
            if flag == 1 {
                return Ok(msg);
            }
        }
    }
}
