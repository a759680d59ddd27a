//! One connection between a node and a server (controller or relay), whichever transport
//! carries it: QUIC on the node's UDP socket, or TLS over TCP ([`crate::tcp`]) where UDP does
//! not get through.
//!
//! Both carry the same two things: the Noise channel ([`crate::channel`]) and relay frames as
//! unreliable datagrams. Code above this module (the controller, the relays, the agent) sees
//! one [`Link`] and never asks which transport it is, except to show it.

use crate::tcp::TcpLink;
use bytes::Bytes;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// How often a link's counters are sampled when it is watched ([`Link::unanswered`], and the
/// agent's dialer).
pub const WATCH_SAMPLE: Duration = Duration::from_millis(250);

/// Which transport carries a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// QUIC over UDP (the node's one socket).
    Quic,
    /// TLS over TCP, after an HTTP/1.1 Upgrade ([`crate::tcp`]).
    Tcp,
}

impl Transport {
    /// Lowercase name, as `mesh status` and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClosed {
    /// The application close code, when one side closed it on purpose (see the `CLOSE_*`
    /// constants of [`crate::quic`], [`crate::channel`] and the relay).
    pub code: Option<u32>,
    /// What happened, for logs and `mesh status`.
    pub reason: String,
}

impl fmt::Display for LinkClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for LinkClosed {}

impl From<quinn::ConnectionError> for LinkClosed {
    fn from(e: quinn::ConnectionError) -> Self {
        let code = match &e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                u32::try_from(c.error_code.into_inner()).ok()
            }
            _ => None,
        };
        LinkClosed {
            code,
            reason: e.to_string(),
        }
    }
}

/// Why a datagram was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Larger than [`Link::max_datagram_size`].
    #[error("datagram too large for the link")]
    TooLarge,
    /// The link is closed.
    #[error("link closed")]
    Closed,
    /// The other side does not take datagrams.
    #[error("datagrams not supported by the other side")]
    Unsupported,
}

/// A connection to a controller or relay.
#[derive(Clone)]
pub enum Link {
    /// QUIC.
    Quic(quinn::Connection),
    /// TLS over TCP.
    Tcp(TcpLink),
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Link({} {})", self.transport(), self.remote_address())
    }
}

impl From<quinn::Connection> for Link {
    fn from(c: quinn::Connection) -> Self {
        Link::Quic(c)
    }
}

impl From<TcpLink> for Link {
    fn from(c: TcpLink) -> Self {
        Link::Tcp(c)
    }
}

impl Link {
    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Quic(_) => Transport::Quic,
            Link::Tcp(_) => Transport::Tcp,
        }
    }

    /// The other side's address (for a TCP link through a proxy: the proxy's, on the node).
    pub fn remote_address(&self) -> SocketAddr {
        crate::net::canonical(match self {
            Link::Quic(c) => c.remote_address(),
            Link::Tcp(c) => c.remote_address(),
        })
    }

    /// On a server: the node's UDP mapping as seen here, which peers may use as an endpoint
    /// candidate. Only QUIC links show it; a TCP connection's source says nothing about the
    /// node's UDP socket.
    pub fn observed_udp(&self) -> Option<SocketAddr> {
        match self {
            Link::Quic(c) => Some(crate::net::canonical(c.remote_address())),
            Link::Tcp(_) => None,
        }
    }

    /// Tells this link apart from every other live one, of either transport.
    pub fn id(&self) -> usize {
        match self {
            Link::Quic(c) => c.stable_id(),
            Link::Tcp(c) => c.id(),
        }
    }

    /// Closes the link with an application `code`; the other side sees the code and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Link::Quic(c) => c.close(code.into(), reason),
            Link::Tcp(c) => c.close(code, reason),
        }
    }

    /// Waits until the link is closed, by either side or by a failure.
    pub async fn closed(&self) -> LinkClosed {
        match self {
            Link::Quic(c) => c.closed().await.into(),
            Link::Tcp(c) => c.closed().await,
        }
    }

    /// Why the link closed, if it has.
    pub fn close_reason(&self) -> Option<LinkClosed> {
        match self {
            Link::Quic(c) => c.close_reason().map(Into::into),
            Link::Tcp(c) => c.close_reason(),
        }
    }

    /// Queues one relay frame. Never waits: when the send buffer is full the oldest queued
    /// frames are dropped.
    pub fn send_datagram(&self, frame: Bytes) -> Result<(), DatagramError> {
        match self {
            Link::Quic(c) => c.send_datagram(frame).map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => DatagramError::TooLarge,
                quinn::SendDatagramError::ConnectionLost(_) => DatagramError::Closed,
                _ => DatagramError::Unsupported,
            }),
            Link::Tcp(c) => c.send_datagram(frame),
        }
    }

    /// The next relay frame received.
    pub async fn read_datagram(&self) -> Result<Bytes, LinkClosed> {
        match self {
            Link::Quic(c) => c.read_datagram().await.map_err(Into::into),
            Link::Tcp(c) => c.read_datagram().await,
        }
    }

    /// Largest frame to send now: what [`Link::send_datagram`] takes on QUIC; on TCP, what
    /// a receiver on QUIC can be handed ([`crate::tcp::SEND_FRAME`]).
    pub fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Link::Quic(c) => c.max_datagram_size(),
            Link::Tcp(_) => Some(crate::tcp::SEND_FRAME),
        }
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        match self {
            Link::Quic(c) => c.rtt(),
            Link::Tcp(c) => c.rtt(),
        }
    }

    /// Datagrams (of any kind: keepalives, acks, frames) received on the link so far: a link
    /// whose count stops moving while it sends keepalives has gone quiet.
    pub fn received(&self) -> u64 {
        match self {
            Link::Quic(c) => c.stats().udp_rx.datagrams,
            Link::Tcp(c) => c.frames_received(),
        }
    }

    /// Datagrams received and frames sent that the other side must answer, so far, where the
    /// transport says (QUIC: every frame but acks, padding and the close; keepalives, stream
    /// data and relayed datagrams included). One snapshot of the connection's statistics.
    fn heard_and_asked(&self) -> Option<(u64, u64)> {
        match self {
            Link::Quic(c) => {
                let stats = c.stats();
                let f = stats.frame_tx;
                let asked = f.ack_frequency
                    + f.crypto
                    + f.data_blocked
                    + f.datagram
                    + u64::from(f.handshake_done)
                    + f.immediate_ack
                    + f.max_data
                    + f.max_stream_data
                    + f.max_streams_bidi
                    + f.max_streams_uni
                    + f.new_connection_id
                    + f.new_token
                    + f.path_challenge
                    + f.path_response
                    + f.ping
                    + f.reset_stream
                    + f.retire_connection_id
                    + f.stream_data_blocked
                    + f.streams_blocked_bidi
                    + f.streams_blocked_uni
                    + f.stop_sending
                    + f.stream;
                Some((stats.udp_rx.datagrams, asked))
            }
            Link::Tcp(_) => None,
        }
    }

    /// Resolves once something this link sent that asks for an answer (a keepalive, a
    /// message, a relayed datagram) has been followed by `after` of silence: nothing at all
    /// received. A server acknowledges at once, so this means the server or the path is gone.
    /// An idle link is not silent in this sense: its keepalives are answered. Never on TCP,
    /// whose pings have their own timeout.
    ///
    /// Sampled every [`WATCH_SAMPLE`]: silence is counted from the first sample that sees a
    /// send after the last receipt, so it starts up to a sample late. A send and a receipt
    /// within one sample count as answered; if the server died just then, the next send is
    /// watched.
    pub async fn unanswered(&self, after: Duration) {
        let Some((mut heard, mut asked)) = self.heard_and_asked() else {
            return std::future::pending().await;
        };
        let mut waiting: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(WATCH_SAMPLE).await;
            let Some((now_heard, now_asked)) = self.heard_and_asked() else {
                return std::future::pending().await;
            };
            if now_heard != heard {
                heard = now_heard;
                asked = now_asked;
                waiting = None;
            } else if now_asked != asked && waiting.is_none() {
                waiting = Some(std::time::Instant::now());
            }
            if waiting.is_some_and(|w| w.elapsed() >= after) {
                return;
            }
        }
    }

    /// Packets sent and declared lost so far, where the transport knows (QUIC): the loss of
    /// the path to the server, keepalives and relayed datagrams included.
    pub fn packet_loss_counters(&self) -> Option<(u64, u64)> {
        match self {
            Link::Quic(c) => {
                let path = c.stats().path;
                Some((path.sent_packets, path.lost_packets))
            }
            Link::Tcp(_) => None,
        }
    }

    /// Relay frames this side dropped because a queue was full (sending or receiving).
    pub fn datagrams_dropped(&self) -> u64 {
        match self {
            // quinn drops the oldest silently and does not count them.
            Link::Quic(_) => 0,
            Link::Tcp(c) => c.datagrams_dropped(),
        }
    }
}
