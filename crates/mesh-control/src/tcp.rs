//! The TCP transport, for networks where UDP does not get through: TLS over TCP (port 443 by
//! default) that starts as an HTTP/1.1 `Upgrade`, so it passes HTTP proxies (CONNECT) and looks
//! like ordinary HTTPS to middleboxes.
//!
//! A connection goes:
//! 1. TCP to the server, or to an HTTP proxy followed by `CONNECT host:port` ([`Proxy`]);
//! 2. TLS 1.3, ALPN `http/1.1`, with the same throwaway certificate as the QUIC side (it proves
//!    nothing; the Noise handshake inside proves the server's pinned key, with keying material
//!    exported from this TLS session in its prologue, so a man in the middle that terminates
//!    TLS cannot pass the handshake on);
//! 3. `GET /mesh HTTP/1.1` with `Connection: Upgrade` and `Upgrade: mesh/1`; the server answers
//!    `101 Switching Protocols` (anything else gets a plain 404);
//! 4. frames, each `[kind u8][length u16 big-endian][payload]`:
//!    - 1 control: one frame of the Noise channel (at most 65,535 bytes);
//!    - 2 datagram: one relay frame (at most [`MAX_DATAGRAM`] bytes);
//!    - 3 ping / 4 pong: 8 bytes, echoed (keepalive and round-trip time);
//!    - 5 close: `[code u32][reason]`, then the sender closes the connection.
//!
//! Unknown kinds are skipped. What one connection can make a side hold is bounded: a few
//! control frames in flight ([`CONTROL_QUEUE`]), relay frames up to
//! [`crate::quic::RELAY_BUFFER`] bytes each way (the oldest go first, counted), and the kernel's
//! send buffer ([`SEND_BUFFER`]). Control frames, pongs and closes are written before any queued
//! relay frame, so bulk relayed traffic delays a control message by at most what the kernel
//! already holds.

use crate::link::{DatagramError, LinkClosed};
use crate::quic::{self, ConfigError};
use base64::Engine as _;
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tracing::debug;

/// The TCP port servers listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 443;
/// The request path of the upgrade.
pub const UPGRADE_PATH: &str = "/mesh";
/// The protocol named in the `Upgrade` header.
pub const UPGRADE_PROTOCOL: &str = "mesh/1";
/// ALPN on the TCP side: what browsers and proxies expect of HTTPS.
pub const ALPN: &[u8] = b"http/1.1";
/// Longest HTTP head (request, response, or a proxy's answer) read.
pub const MAX_HEAD: usize = 4096;
/// Largest relay frame carried (a whole relayed message with its header: no fragments).
pub const MAX_DATAGRAM: usize = mesh_proto::relay::HEADER_LEN + mesh_proto::relay::MAX_MESSAGE;
/// The frame size a node sends over TCP ([`crate::Link::max_datagram_size`]): the relay
/// forwards frames as they are, and the receiver may be on QUIC, whose datagrams carry about
/// 1,160 bytes on a path at QUIC's minimum MTU. Larger messages go as fragments, as on QUIC.
pub const SEND_FRAME: usize = 1150;
/// A ping goes out this often. TCP has no probe timeout of its own here, so the idle rule
/// below counts missed pings: kept at 1 s, apart from QUIC's keepalive.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A connection that delivers nothing for this long is dead (pings arrive every
/// [`KEEPALIVE`], so this is three missed ones plus a round trip).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Control frames waiting in each direction: each is at most 64 KiB.
pub const CONTROL_QUEUE: usize = 2;
/// The kernel's send buffer for the connection: bounds how much relayed data a control message
/// can find ahead of it.
pub const SEND_BUFFER: usize = 256 * 1024;
/// Time for TCP, the proxy, TLS and the upgrade together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CLOSE_REASON: usize = 256;
const HEADER: usize = 3;

mod kind {
    pub const CONTROL: u8 = 1;
    pub const DATAGRAM: u8 = 2;
    pub const PING: u8 = 3;
    pub const PONG: u8 = 4;
    pub const CLOSE: u8 = 5;
}

/// Why a TCP link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// TCP did not connect (to the server or to the proxy).
    #[error("TCP connection to {to} failed: {reason}")]
    Connect {
        /// Where to.
        to: String,
        /// What failed.
        reason: String,
    },
    /// The proxy refused the CONNECT.
    #[error("HTTP proxy {proxy} refused CONNECT {target}: {status}")]
    Proxy {
        /// The proxy.
        proxy: String,
        /// Where we asked to go.
        target: String,
        /// Its status line.
        status: String,
    },
    /// TLS failed.
    #[error("TLS with {to} failed: {reason}")]
    Tls {
        /// Where to.
        to: String,
        /// What failed.
        reason: String,
    },
    /// The server did not upgrade (not a mesh server, or a middlebox in between).
    #[error("{to} did not switch to the mesh protocol: {status}")]
    Upgrade {
        /// Where to.
        to: String,
        /// What it said.
        status: String,
    },
    /// It all took longer than [`HANDSHAKE_TIMEOUT`] (or the caller's timeout).
    #[error("no TLS answer from {to} within {}", humantime_secs(*.after))]
    Timeout {
        /// Where to.
        to: String,
        /// How long we waited.
        after: Duration,
    },
    /// Local configuration failed.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// An HTTP proxy to reach servers through (`CONNECT`), as given by `HTTPS_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `Proxy-Authorization: Basic` credentials (`user:password`), if the URL had them.
    pub credentials: Option<String>,
}

impl Proxy {
    /// Parses a proxy URL as found in `HTTPS_PROXY`: `http://[user:pass@]host[:port]` or
    /// `host:port`; without a port, 80 (as curl).
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let url = url.trim();
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") || url.contains("://") {
            return Err(format!(
                "proxy {url:?}: only http:// proxies (CONNECT) are supported"
            ));
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c.to_owned()), h),
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.contains('/') {
            return Err(format!("proxy {url:?}: expected http://host:port"));
        }
        let has_port = hostport.rsplit_once(':').is_some_and(|(h, p)| {
            p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
        });
        let addr = if has_port {
            hostport.to_owned()
        } else {
            format!("{hostport}:80")
        };
        Ok(Proxy { addr, credentials })
    }
}

/// How a node dials.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    /// The firewall mark for the socket (keeps it off the overlay; see `mesh_sys::bypass`).
    pub mark: Option<u32>,
    /// The proxy to go through, if any.
    pub proxy: Option<Proxy>,
}

/// Opens a link to `target` (`host:port`, the server's TCP address), through the dialer's
/// proxy if it has one.
pub async fn connect(dialer: &Dialer, target: &str) -> Result<TcpLink, TcpError> {
    let attempt = async {
        let started = Instant::now();
        let (stream, remote) = match &dialer.proxy {
            Some(proxy) => {
                let (mut s, remote) = tcp_connect(&proxy.addr, dialer.mark).await?;
                proxy_connect(&mut s, proxy, target).await?;
                (s, remote)
            }
            None => tcp_connect(target, dialer.mark).await?,
        };
        let host = target
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(target);
        // A name is sent as SNI, as a browser would; an IP address is not.
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .or_else(|_| rustls::pki_types::ServerName::try_from("mesh-controller".to_owned()))
            .map_err(|e| TcpError::Tls {
                to: target.to_owned(),
                reason: e.to_string(),
            })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(quic::tls_client(ALPN)?));
        let stream = tls.connect(name, stream).await.map_err(|e| TcpError::Tls {
            to: target.to_owned(),
            reason: e.to_string(),
        })?;
        let exporter = export(stream.get_ref().1).map_err(|reason| TcpError::Tls {
            to: target.to_owned(),
            reason,
        })?;
        let mut stream = BufReader::new(stream);
        let request = format!(
            "GET {UPGRADE_PATH} HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\nUser-Agent: mesh/{}\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        let upgrade_err = |status: String| TcpError::Upgrade {
            to: target.to_owned(),
            status,
        };
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| upgrade_err(e.to_string()))?;
        stream
            .flush()
            .await
            .map_err(|e| upgrade_err(e.to_string()))?;
        let head = read_head(&mut stream).await.map_err(upgrade_err)?;
        let status = head.lines().next().unwrap_or("").to_owned();
        if !status.starts_with("HTTP/1.1 101") || !has_upgrade(&head) {
            return Err(upgrade_err(status));
        }
        Ok(TcpLink::start(stream, remote, exporter, started.elapsed()))
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(TcpError::Timeout {
            to: target.to_owned(),
            after: HANDSHAKE_TIMEOUT,
        }),
    }
}

async fn tcp_connect(to: &str, mark: Option<u32>) -> Result<(TcpStream, SocketAddr), TcpError> {
    let fail = |reason: String| TcpError::Connect {
        to: to.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(to)
        .await
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = "no address".to_owned();
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| fail(e.to_string()))?;
        if let Some(mark) = mark {
            // Without CAP_NET_ADMIN the mark cannot be set; the candidate filters still apply.
            if let Err(e) = socket2::SockRef::from(&socket).set_mark(mark) {
                debug!(error = %e, "cannot mark the TCP socket");
            }
        }
        let _ = socket.set_send_buffer_size(SEND_BUFFER as u32);
        match socket.connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok((s, addr));
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(fail(last))
}

async fn proxy_connect(s: &mut TcpStream, proxy: &Proxy, target: &str) -> Result<(), TcpError> {
    let refused = |status: String| TcpError::Proxy {
        proxy: proxy.addr.clone(),
        target: target.to_owned(),
        status,
    };
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(c) = &proxy.credentials {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_bytes());
        req.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| refused(e.to_string()))?;
    // Byte by byte: nothing may be read past the proxy's head (the TLS handshake follows).
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(refused("answer head too long".into()));
        }
        let b = s.read_u8().await.map_err(|e| refused(e.to_string()))?;
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or("").to_owned();
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with("HTTP/1.") && code == "200" {
        Ok(())
    } else {
        Err(refused(status))
    }
}

/// Reads an HTTP head (up to the blank line, at most [`MAX_HEAD`] bytes), leaving what follows
/// in the reader's buffer.
async fn read_head<S: AsyncRead + Unpin>(s: &mut BufReader<S>) -> Result<String, String> {
    let mut head = Vec::with_capacity(256);
    loop {
        let n = s
            .read_until(b'\n', &mut head)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during the HTTP head".into());
        }
        if head.len() > MAX_HEAD {
            return Err("HTTP head too long".into());
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            break;
        }
    }
    String::from_utf8(head).map_err(|_| "HTTP head is not UTF-8".into())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn has_upgrade(head: &str) -> bool {
    header(head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL))
}

fn export<C>(conn: &rustls::ConnectionCommon<C>) -> Result<[u8; 32], String> {
    conn.export_keying_material([0u8; 32], crate::channel::EXPORTER_LABEL, Some(b""))
        .map_err(|e| format!("cannot export TLS keying material: {e}"))
}

/// The server side: a TCP listener and the TLS settings.
pub struct Listener {
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

/// A listening TCP socket on `listen` (nonblocking, address reuse; an unspecified IPv6 address
/// takes both families).
fn bind_tcp(listen: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let SocketAddr::V6(v6) = listen {
        socket.set_only_v6(!v6.ip().is_unspecified())?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

impl Listener {
    /// Binds `listen`. Must be called inside a tokio runtime. An unspecified IPv6 address (`[::]:443`) listens on both families, IPv4 alone where
    /// the kernel has no IPv6.
    pub fn bind(listen: SocketAddr) -> std::io::Result<Listener> {
        let socket = crate::net::with_ipv4_fallback(listen, bind_tcp)?;
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let tls = quic::tls_server(ALPN).map_err(std::io::Error::other)?;
        Ok(Listener {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next TCP connection (not yet upgraded: see [`Upgrader::upgrade`]).
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (s, remote) = self.listener.accept().await?;
        let _ = s.set_nodelay(true);
        let _ = socket2::SockRef::from(&s).set_send_buffer_size(SEND_BUFFER);
        Ok((s, crate::net::canonical(remote)))
    }

    /// What turns an accepted connection into a link, for the connection's own task.
    pub fn upgrader(&self) -> Upgrader {
        Upgrader {
            tls: self.tls.clone(),
        }
    }
}

/// Runs TLS and the HTTP upgrade on an accepted connection.
#[derive(Clone)]
pub struct Upgrader {
    tls: tokio_rustls::TlsAcceptor,
}

impl Upgrader {
    /// TLS, then the upgrade request; anything that is not one gets a 404 and is closed.
    /// Bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn upgrade(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
    ) -> Result<TcpLink, TcpError> {
        let to = remote.to_string();
        let attempt = async {
            let started = Instant::now();
            let stream = self.tls.accept(stream).await.map_err(|e| TcpError::Tls {
                to: to.clone(),
                reason: e.to_string(),
            })?;
            let exporter = export(stream.get_ref().1).map_err(|reason| TcpError::Tls {
                to: to.clone(),
                reason,
            })?;
            let mut stream = BufReader::new(stream);
            let bad = |status: String| TcpError::Upgrade {
                to: to.clone(),
                status,
            };
            let head = read_head(&mut stream).await.map_err(bad)?;
            let line = head.lines().next().unwrap_or("").to_owned();
            let mut parts = line.split_whitespace();
            let ok = parts.next() == Some("GET")
                && parts.next() == Some(UPGRADE_PATH)
                && has_upgrade(&head);
            if !ok {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let _ = stream.shutdown().await;
                return Err(bad(format!("not an upgrade request: {line:?}")));
            }
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n\r\n"
            );
            stream
                .write_all(answer.as_bytes())
                .await
                .map_err(|e| bad(e.to_string()))?;
            stream.flush().await.map_err(|e| bad(e.to_string()))?;
            Ok(TcpLink::start(stream, remote, exporter, started.elapsed()))
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(TcpError::Timeout {
                to: remote.to_string(),
                after: HANDSHAKE_TIMEOUT,
            }),
        }
    }
}

/// Relay frames queued one way, bounded in bytes; the oldest go first when full.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

impl Queue {
    /// Adds `frame`; returns how many older frames were dropped to make room.
    fn push(&mut self, frame: Bytes) -> u64 {
        let mut dropped = 0;
        while self.bytes + frame.len() > quic::RELAY_BUFFER {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.len();
            dropped += 1;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        dropped
    }

    fn pop(&mut self) -> Option<Bytes> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }
}

struct Inner {
    remote: SocketAddr,
    exporter: [u8; 32],
    /// Control frames to send.
    control_out: mpsc::Sender<Bytes>,
    /// Control frames received (the channel reads them one task at a time).
    control_in: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    out: Mutex<Queue>,
    /// Pongs to send, before anything else.
    pongs: Mutex<Vec<[u8; 8]>>,
    /// Wakes the writer: a relay frame or a pong was queued.
    wake_writer: Notify,
    inbox: Mutex<Queue>,
    wake_reader: Notify,
    state: watch::Sender<Option<LinkClosed>>,
    /// The close frame to send, when this side closes.
    close_frame: Mutex<Option<Bytes>>,
    started: Instant,
    rtt_us: AtomicU64,
    frames_rx: AtomicU64,
    dropped: AtomicU64,
}

impl Inner {
    fn set_closed(&self, code: Option<u32>, reason: String) -> bool {
        self.state.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(LinkClosed { code, reason });
            true
        })
    }

    fn close(&self, code: u32, reason: &[u8]) {
        if self.state.borrow().is_some() {
            return;
        }
        let reason = &reason[..reason.len().min(MAX_CLOSE_REASON)];
        let mut frame = Vec::with_capacity(4 + reason.len());
        frame.extend_from_slice(&code.to_be_bytes());
        frame.extend_from_slice(reason);
        *lock(&self.close_frame) = Some(frame.into());
        self.set_closed(
            Some(code),
            format!("closed locally: {}", String::from_utf8_lossy(reason)),
        );
    }
}

/// Closes the link when the last handle its owners hold goes (the reader and writer tasks
/// hold none), as dropping a QUIC connection does.
struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(0, b"dropped");
    }
}

/// One upgraded TCP connection (see the module docs). Clones share it; when the last clone
/// goes, the connection is closed.
#[derive(Clone)]
pub struct TcpLink {
    inner: Arc<Inner>,
    /// `None` in the link's own tasks.
    _owner: Option<Arc<CloseOnDrop>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TcpLink {
    fn start<S>(stream: S, remote: SocketAddr, exporter: [u8; 32], rtt: Duration) -> TcpLink
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (control_out, control_out_rx) = mpsc::channel(CONTROL_QUEUE);
        let (control_in_tx, control_in) = mpsc::channel(CONTROL_QUEUE);
        let inner = Arc::new(Inner {
            remote,
            exporter,
            control_out,
            control_in: tokio::sync::Mutex::new(control_in),
            out: Mutex::new(Queue::default()),
            pongs: Mutex::new(Vec::new()),
            wake_writer: Notify::new(),
            inbox: Mutex::new(Queue::default()),
            wake_reader: Notify::new(),
            state: watch::channel(None).0,
            close_frame: Mutex::new(None),
            started: Instant::now(),
            rtt_us: AtomicU64::new(rtt.as_micros() as u64),
            frames_rx: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let task = || TcpLink {
            inner: inner.clone(),
            _owner: None,
        };
        let (read, write) = tokio::io::split(stream);
        tokio::spawn(task().read_loop(read, control_in_tx));
        tokio::spawn(task().write_loop(write, control_out_rx));
        TcpLink {
            _owner: Some(Arc::new(CloseOnDrop(inner.clone()))),
            inner,
        }
    }

    /// The other side's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    /// Tells this link apart from every other live one.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Keying material exported from the TLS session (the Noise prologue binds to it).
    pub(crate) fn exporter(&self) -> [u8; 32] {
        self.inner.exporter
    }

    fn set_closed(&self, code: Option<u32>, reason: String) -> bool {
        self.inner.set_closed(code, reason)
    }

    /// Closes the link: the other side receives `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code, reason);
    }

    /// Waits until the link is closed.
    pub async fn closed(&self) -> LinkClosed {
        let mut rx = self.inner.state.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                return LinkClosed {
                    code: None,
                    reason: "link dropped".into(),
                };
            }
        }
    }

    /// Why the link closed, if it has.
    pub fn close_reason(&self) -> Option<LinkClosed> {
        self.inner.state.borrow().clone()
    }

    /// Queues a relay frame (the oldest queued go when [`crate::quic::RELAY_BUFFER`] is full).
    pub fn send_datagram(&self, frame: Bytes) -> Result<(), DatagramError> {
        if frame.len() > MAX_DATAGRAM {
            return Err(DatagramError::TooLarge);
        }
        if self.inner.state.borrow().is_some() {
            return Err(DatagramError::Closed);
        }
        let dropped = lock(&self.inner.out).push(frame);
        if dropped > 0 {
            self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        self.inner.wake_writer.notify_one();
        Ok(())
    }

    /// The next relay frame received.
    pub async fn read_datagram(&self) -> Result<Bytes, LinkClosed> {
        let mut state = self.inner.state.subscribe();
        loop {
            if let Some(f) = lock(&self.inner.inbox).pop() {
                return Ok(f);
            }
            if let Some(c) = state.borrow_and_update().clone() {
                return Err(c);
            }
            tokio::select! {
                _ = self.inner.wake_reader.notified() => {}
                _ = state.changed() => {}
            }
        }
    }

    /// Smoothed round-trip time (TLS handshake, then pings).
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.inner.rtt_us.load(Ordering::Relaxed))
    }

    /// Frames received so far.
    pub fn frames_received(&self) -> u64 {
        self.inner.frames_rx.load(Ordering::Relaxed)
    }

    /// Relay frames dropped because a queue was full, both ways.
    pub fn datagrams_dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Sends one control frame (waits while [`CONTROL_QUEUE`] frames are queued).
    pub(crate) async fn send_control(&self, frame: Bytes) -> Result<(), LinkClosed> {
        let mut state = self.inner.state.subscribe();
        if let Some(c) = state.borrow_and_update().clone() {
            return Err(c);
        }
        tokio::select! {
            r = self.inner.control_out.send(frame) => r.map_err(|_| self.closed_now()),
            _ = state.changed() => Err(self.closed_now()),
        }
    }

    /// Receives one control frame.
    pub(crate) async fn recv_control(&self) -> Result<Bytes, LinkClosed> {
        let mut rx = self.inner.control_in.lock().await;
        // Frames that arrived before a close are still delivered.
        match rx.recv().await {
            Some(f) => Ok(f),
            None => Err(self.closed_now()),
        }
    }

    fn closed_now(&self) -> LinkClosed {
        self.close_reason().unwrap_or(LinkClosed {
            code: None,
            reason: "link closed".into(),
        })
    }

    async fn read_loop<R: AsyncRead + Unpin>(self, mut read: R, control_in: mpsc::Sender<Bytes>) {
        let mut state = self.inner.state.subscribe();
        let mut smoothed: Option<f64> = None;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut read)) => f,
                _ = state.changed() => break,
            };
            let (kind, payload) = match frame {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "connection closed by the other side".to_owned()
                    } else {
                        format!("connection lost: {e}")
                    };
                    self.set_closed(None, reason);
                    break;
                }
                Err(_) => {
                    self.set_closed(
                        None,
                        format!("timed out: nothing heard for {} s", IDLE_TIMEOUT.as_secs()),
                    );
                    break;
                }
            };
            self.inner.frames_rx.fetch_add(1, Ordering::Relaxed);
            match kind {
                kind::CONTROL => {
                    let sent = tokio::select! {
                        r = control_in.send(payload) => r.is_ok(),
                        _ = state.changed() => false,
                    };
                    if !sent {
                        break;
                    }
                }
                kind::DATAGRAM if payload.len() <= MAX_DATAGRAM => {
                    let dropped = lock(&self.inner.inbox).push(payload);
                    if dropped > 0 {
                        self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
                    }
                    self.inner.wake_reader.notify_one();
                }
                kind::DATAGRAM => {
                    self.set_closed(None, "relay frame over the size limit".into());
                    break;
                }
                kind::PING if payload.len() == 8 => {
                    let mut echo = [0u8; 8];
                    echo.copy_from_slice(&payload);
                    lock(&self.inner.pongs).push(echo);
                    self.inner.wake_writer.notify_one();
                }
                kind::PONG if payload.len() == 8 => {
                    let mut sent = [0u8; 8];
                    sent.copy_from_slice(&payload);
                    let sent = Duration::from_micros(u64::from_be_bytes(sent));
                    let sample = self.inner.started.elapsed().saturating_sub(sent);
                    let s = sample.as_secs_f64();
                    let next = match smoothed {
                        Some(old) => old * 7.0 / 8.0 + s / 8.0,
                        None => s,
                    };
                    smoothed = Some(next);
                    self.inner
                        .rtt_us
                        .store((next * 1e6) as u64, Ordering::Relaxed);
                }
                kind::CLOSE if payload.len() >= 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    let reason = String::from_utf8_lossy(&payload[4..]).into_owned();
                    self.set_closed(Some(code), format!("closed by the other side: {reason}"));
                    break;
                }
                _ => {} // unknown kinds and malformed pings are skipped
            }
        }
        // Wake readers of relay frames; control readers see the channel end.
        self.inner.wake_reader.notify_one();
    }

    async fn write_loop<W: AsyncWrite + Unpin>(
        self,
        write: W,
        mut control_out: mpsc::Receiver<Bytes>,
    ) {
        let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, write);
        let mut state = self.inner.state.subscribe();
        let mut ping = tokio::time::interval(KEEPALIVE);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result: std::io::Result<()> = async {
            loop {
                // Pongs and control frames first, then one relay frame at a time.
                let pongs = std::mem::take(&mut *lock(&self.inner.pongs));
                for p in pongs {
                    write_frame(&mut w, kind::PONG, &p).await?;
                }
                if let Ok(f) = control_out.try_recv() {
                    write_frame(&mut w, kind::CONTROL, &f).await?;
                    continue;
                }
                let next = lock(&self.inner.out).pop();
                if let Some(f) = next {
                    write_frame(&mut w, kind::DATAGRAM, &f).await?;
                    continue;
                }
                w.flush().await?;
                tokio::select! {
                    biased;
                    _ = state.changed() => return Ok(()),
                    f = control_out.recv() => match f {
                        Some(f) => write_frame(&mut w, kind::CONTROL, &f).await?,
                        None => return Ok(()),
                    },
                    _ = self.inner.wake_writer.notified() => {}
                    _ = ping.tick() => {
                        let at = self.inner.started.elapsed().as_micros() as u64;
                        write_frame(&mut w, kind::PING, &at.to_be_bytes()).await?;
                    }
                }
                if state.borrow().is_some() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => {
                let frame = lock(&self.inner.close_frame).take();
                if let Some(frame) = frame {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        write_frame(&mut w, kind::CLOSE, &frame).await?;
                        w.flush().await?;
                        w.shutdown().await
                    })
                    .await;
                }
            }
            Err(e) => {
                self.set_closed(None, format!("connection lost: {e}"));
            }
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Bytes)> {
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((header[0], payload.into()))
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| std::io::Error::other("frame over 65535 bytes"))?;
    let mut header = [0u8; HEADER];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://proxy.example:3128").unwrap();
        assert_eq!(p.addr, "proxy.example:3128");
        assert_eq!(p.credentials, None);
        let p = Proxy::parse("http://user:secret@192.0.2.7:8080/").unwrap();
        assert_eq!(p.addr, "192.0.2.7:8080");
        assert_eq!(p.credentials.as_deref(), Some("user:secret"));
        assert_eq!(
            Proxy::parse("192.0.2.7:3128").unwrap().addr,
            "192.0.2.7:3128"
        );
        assert_eq!(Proxy::parse("http://proxy").unwrap().addr, "proxy:80");
        assert!(Proxy::parse("https://proxy:443").is_err());
        assert!(Proxy::parse("socks5://proxy:1080").is_err());
    }

    #[test]
    fn queue_drops_oldest_when_full() {
        let mut q = Queue::default();
        let frame = Bytes::from(vec![0u8; 1000]);
        let mut dropped = 0;
        for _ in 0..(quic::RELAY_BUFFER / 1000 + 10) {
            dropped += q.push(frame.clone());
        }
        assert!(q.bytes <= quic::RELAY_BUFFER);
        assert_eq!(dropped, 10);
    }

    #[test]
    fn upgrade_header_is_found_case_insensitively() {
        let head = "GET /mesh HTTP/1.1\r\nhost: x\r\nUPGRADE:  Mesh/1 \r\n\r\n";
        assert!(has_upgrade(head));
        assert!(!has_upgrade(
            "GET /mesh HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        ));
    }
}
