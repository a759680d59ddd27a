//! The node's one UDP socket and the QUIC endpoint that rides on it.
//!
//! The socket is dual-stack where the host has IPv6 (`[::]:port` with `IPV6_V6ONLY` off), so
//! WireGuard, QUIC and STUN of both families share one port and one demultiplexer. The kernel
//! names IPv4 senders of such a socket by IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`);
//! [`UdpPort`] turns them back into plain IPv4 addresses on receive and maps them again on send,
//! so the rest of the node only ever sees one form of each address. quinn maps IPv4 addresses
//! itself on an IPv6 socket, so its side ([`QuicSocket`]) is handed the mapped form.

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::RwLock;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::sync::mpsc;

/// Most QUIC datagrams queued for the quinn endpoint before new ones are dropped (QUIC recovers).
pub const QUIC_INBOX: usize = 1024;

/// The socket buffers mesh asks for, each way: a few GSO batches of every peer in flight at
/// once, as Tailscale sizes them.
pub const SOCKET_BUFFER: usize = 7 << 20;

/// A socket's buffer sizes, as the kernel granted them (see [`UdpPort::size_buffers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    /// Receive buffer, bytes.
    pub recv: usize,
    /// Send buffer, bytes.
    pub send: usize,
}

/// Asks the kernel for receive and send buffers of `want` bytes each on socket `fd`: past the
/// `net.core.rmem_max`/`wmem_max` limits where the process may (`SO_RCVBUFFORCE` with
/// CAP_NET_ADMIN), within them otherwise. Returns what the socket holds now; less than asked
/// means bursts are more likely to be dropped by the kernel.
pub fn size_buffers(fd: &impl std::os::fd::AsFd, want: usize) -> BufferSizes {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(fd, sockopt::RcvBufForce, &want).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &want);
    }
    if setsockopt(fd, sockopt::SndBufForce, &want).is_err() {
        let _ = setsockopt(fd, sockopt::SndBuf, &want);
    }
    buffer_sizes(fd)
}

/// The receive and send buffers socket `fd` holds now.
pub fn buffer_sizes(fd: &impl std::os::fd::AsFd) -> BufferSizes {
    use nix::sys::socket::{getsockopt, sockopt};
    // The kernel reports twice what it keeps for data (the rest is its bookkeeping).
    BufferSizes {
        recv: getsockopt(fd, sockopt::RcvBuf).unwrap_or(0) / 2,
        send: getsockopt(fd, sockopt::SndBuf).unwrap_or(0) / 2,
    }
}

impl BufferSizes {
    /// How many of the two buffers hold less than `want` bytes (0, 1 or 2).
    pub fn short_of(&self, want: usize) -> usize {
        usize::from(self.recv < want) + usize::from(self.send < want)
    }
}

/// One UDP socket, shared by the data path (WireGuard) and the QUIC endpoint.
#[derive(Clone)]
pub struct UdpPort {
    inner: Arc<Inner>,
}

struct Inner {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// An IPv6 socket (dual-stack): IPv4 destinations are sent to as IPv4-mapped addresses.
    v6: bool,
    /// The IPv6 addresses datagrams to IPv6 destinations leave from (see
    /// [`UdpPort::set_ipv6_sources`]); empty: the kernel's choice.
    sources6: RwLock<Vec<Ipv6Addr>>,
}

impl fmt::Debug for UdpPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpPort")
            .field("local", &self.inner.io.local_addr().ok())
            .finish()
    }
}

/// A datagram (or a GSO batch of equal-size datagrams) to send.
#[derive(Debug)]
pub struct Batch<'a> {
    /// Destination.
    pub dst: SocketAddr,
    /// The bytes; with `segment_size`, several datagrams back to back.
    pub contents: &'a [u8],
    /// Size of each datagram in `contents` (the last may be shorter), for GSO.
    pub segment_size: Option<usize>,
}

impl UdpPort {
    /// Binds the socket to `addr`. Must run inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpPort> {
        UdpPort::from_std(std::net::UdpSocket::bind(addr)?)
    }

    /// Takes over a bound socket (a dual-stack one from `mesh_control::net::bind_udp_dual_stack`,
    /// say). Must run inside a tokio runtime.
    pub fn from_std(std: std::net::UdpSocket) -> io::Result<UdpPort> {
        std.set_nonblocking(true)?;
        let v6 = std.local_addr()?.is_ipv6();
        let state = UdpSocketState::new((&std).into())?;
        let io = tokio::net::UdpSocket::from_std(std)?;
        Ok(UdpPort {
            inner: Arc::new(Inner {
                io,
                state,
                v6,
                sources6: RwLock::new(Vec::new()),
            }),
        })
    }

    /// The node's own IPv6 addresses that it offers its peers: every datagram to an IPv6
    /// destination leaves from the one that shares the longest prefix with it. Linux would
    /// otherwise pick a temporary (privacy) address where `use_tempaddr=2` prefers them, which
    /// no peer was told about, so stateful firewalls on both sides drop the crossing probes.
    pub fn set_ipv6_sources(&self, sources: Vec<Ipv6Addr>) {
        if let Ok(mut s) = self.inner.sources6.write() {
            *s = sources;
        }
    }

    /// The source for a datagram to `dst` (see [`UdpPort::set_ipv6_sources`]).
    fn source_for(&self, dst: SocketAddr) -> Option<IpAddr> {
        let SocketAddr::V6(d) = dst else {
            return None;
        };
        if d.ip().to_ipv4_mapped().is_some() {
            return None;
        }
        let sources = self.inner.sources6.read().ok()?;
        let common = |s: &Ipv6Addr| (u128::from(*s) ^ u128::from(*d.ip())).leading_zeros();
        sources
            .iter()
            .max_by_key(|s| common(s))
            .map(|s| IpAddr::V6(*s))
    }

    /// Whether the socket carries IPv6 (it is dual-stack then).
    pub fn is_dual_stack(&self) -> bool {
        self.inner.v6
    }

    /// Marks the socket's packets with [`crate::bypass::MARK`] so that they never enter the
    /// overlay. Fails without CAP_NET_ADMIN.
    pub fn set_bypass_mark(&self) -> io::Result<()> {
        crate::bypass::mark_socket(&self.inner.io)
    }

    /// Asks the kernel for receive and send buffers of `want` bytes each (mesh uses
    /// [`SOCKET_BUFFER`]): see [`size_buffers`].
    pub fn size_buffers(&self, want: usize) -> BufferSizes {
        size_buffers(&self.inner.io, want)
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.io.local_addr()
    }

    /// How many datagrams one GSO send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.inner.state.max_gso_segments()
    }

    /// How many datagrams one received buffer may hold (GRO), 1 without GRO.
    pub fn gro_segments(&self) -> usize {
        self.inner.state.gro_segments()
    }

    /// Receives a batch of datagrams (recvmmsg; GRO may coalesce several into one buffer, see
    /// `RecvMeta::stride`). Waits until at least one is there.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.inner.io.readable().await?;
            match self.inner.io.try_io(Interest::READABLE, || {
                self.inner.state.recv((&self.inner.io).into(), bufs, meta)
            }) {
                Ok(n) => return Ok(canonical_meta(meta, n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// [`UdpPort::recv`] without waiting: `WouldBlock` when nothing is there.
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.inner
            .io
            .try_io(Interest::READABLE, || {
                self.inner.state.recv((&self.inner.io).into(), bufs, meta)
            })
            .map(|n| canonical_meta(meta, n))
    }

    /// `dst` as this socket must be given it: IPv4-mapped on a dual-stack socket.
    fn socket_form(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(v4) if self.inner.v6 => {
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
            }
            other => other,
        }
    }

    /// Sends one datagram or GSO batch, waiting for buffer space if needed. Send errors that
    /// concern one destination (unreachable, and so on) are returned for the caller to count.
    ///
    /// An ICMP error caused by an *earlier* datagram (a probe to a closed port, say) is reported
    /// by the kernel on the next send, which it fails without sending. That error is consumed
    /// by reporting it, so such a send is tried once more: one dead destination must not cost
    /// the datagram that happens to follow it.
    pub async fn send(&self, batch: &Batch<'_>) -> io::Result<()> {
        let t = self.transmit(batch);
        let mut retried = false;
        loop {
            self.inner.io.writable().await?;
            match self.send_now(&t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !retried && is_deferred_icmp_error(&e) => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one datagram or GSO batch if the socket takes it now, else `WouldBlock` and
    /// nothing is sent; a deferred ICMP error is tried past once, as in [`UdpPort::send`].
    pub fn try_send(&self, batch: &Batch<'_>) -> io::Result<()> {
        let t = self.transmit(batch);
        retried_once(|| self.send_now(&t))
    }

    fn transmit<'a>(&self, batch: &Batch<'a>) -> Transmit<'a> {
        Transmit {
            destination: self.socket_form(batch.dst),
            ecn: None,
            contents: batch.contents,
            segment_size: batch.segment_size,
            src_ip: self.source_for(batch.dst),
        }
    }

    /// One non-blocking send call.
    fn send_now(&self, t: &Transmit<'_>) -> io::Result<()> {
        self.inner.io.try_io(Interest::WRITABLE, || {
            self.inner.state.send((&self.inner.io).into(), t)
        })
    }

    /// Sends one datagram to `dst` with IP TTL (IPv6: hop limit) `ttl` (a primer), waiting for
    /// buffer space if needed, and leaving the socket's default TTL alone for everything else on
    /// it (QUIC included): the TTL travels with the datagram (an `IP_TTL` or `IPV6_HOPLIMIT`
    /// control message; an IPv4 destination of a dual-stack socket takes the IPv4 one).
    pub async fn send_with_ttl(&self, dst: SocketAddr, contents: &[u8], ttl: u8) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn, SockaddrIn6};
        use std::os::fd::AsRawFd;
        let ttl = i32::from(ttl);
        let source = match self.source_for(dst) {
            Some(IpAddr::V6(s)) => Some(nix::libc::in6_pktinfo {
                ipi6_ifindex: 0,
                ipi6_addr: nix::libc::in6_addr {
                    s6_addr: s.octets(),
                },
            }),
            _ => None,
        };
        let mut cmsg = vec![match dst {
            SocketAddr::V4(_) => ControlMessage::Ipv4Ttl(&ttl),
            SocketAddr::V6(_) => ControlMessage::Ipv6HopLimit(&ttl),
        }];
        if let Some(info) = source.as_ref() {
            cmsg.push(ControlMessage::Ipv6PacketInfo(info));
        }
        let iov = [io::IoSlice::new(contents)];
        let (v4, v6) = match self.socket_form(dst) {
            SocketAddr::V4(a) => (Some(SockaddrIn::from(a)), None),
            SocketAddr::V6(a) if self.inner.v6 => (None, Some(SockaddrIn6::from(a))),
            SocketAddr::V6(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "an IPv6 destination needs a dual-stack socket",
                ))
            }
        };
        let mut retried = false;
        loop {
            self.inner.io.writable().await?;
            match self.inner.io.try_io(Interest::WRITABLE, || {
                let fd = self.inner.io.as_raw_fd();
                match (&v4, &v6) {
                    (Some(a), _) => sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(a)),
                    (_, a) => sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), a.as_ref()),
                }
                .map(|_| ())
                .map_err(io::Error::from)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !retried && is_deferred_icmp_error(&e) => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the QUIC side of this socket. Feed it QUIC datagrams with [`QuicInbox::deliver`].
    pub fn quic(&self) -> (QuicInbox, Arc<QuicSocket>) {
        let (tx, rx) = mpsc::channel(QUIC_INBOX);
        (
            QuicInbox { tx },
            Arc::new(QuicSocket {
                port: self.clone(),
                rx: Mutex::new(rx),
            }),
        )
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned back into the IPv4 one.
fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Turns the senders of the first `n` received datagrams into their canonical form; returns `n`.
fn canonical_meta(meta: &mut [RecvMeta], n: usize) -> usize {
    for m in meta.iter_mut().take(n) {
        m.addr = canonical_addr(m.addr);
        m.dst_ip = m.dst_ip.map(|ip| ip.to_canonical());
    }
    n
}

/// Most datagrams one GSO send of [`send_plain`] carries (Linux takes 64 in every version that
/// has UDP GSO).
const PLAIN_GSO_SEGMENTS: usize = 64;
/// Most bytes one GSO send of [`send_plain`] carries: the batch must fit one UDP datagram's
/// length field with its headers, or the kernel refuses it whole.
const PLAIN_GSO_BYTES: usize = 64_000;

/// Sends `contents` to `dst` on a plain non-blocking socket, without waiting: one datagram, or
/// with `segment_size` several back to back, each GSO run (at most 64 datagrams) in one system
/// call (`UDP_SEGMENT`); a run the kernel refuses as a batch goes one datagram at a time.
/// Returns how many datagrams went. A send failed by an ICMP error about an earlier datagram
/// is tried once more (see [`UdpPort::send`]). For sockets a runtime does not drive (mesh's
/// birthday sockets): no readiness is needed, so a new socket's first probe leaves at once.
pub fn send_plain(
    socket: &std::net::UdpSocket,
    dst: SocketAddr,
    contents: &[u8],
    segment_size: Option<usize>,
) -> usize {
    let one = |d: &[u8]| retried_once(|| socket.send_to(d, dst).map(|_| ()));
    let Some(size) = segment_size.filter(|s| *s > 0 && contents.len() > *s) else {
        return usize::from(one(contents).is_ok());
    };
    let per_call = size * PLAIN_GSO_SEGMENTS.min(PLAIN_GSO_BYTES / size).max(1);
    let mut sent = 0;
    for run in contents.chunks(per_call) {
        let datagrams = run.len().div_ceil(size);
        let segment = u16::try_from(size).ok().filter(|_| datagrams > 1);
        if segment.is_some_and(|segment| gso_send(socket, dst, run, segment)) {
            sent += datagrams;
        } else {
            sent += run.chunks(size).filter(|d| one(d).is_ok()).count();
        }
    }
    sent
}

/// One `sendmsg` of `run` with `UDP_SEGMENT` = `segment`; whether the kernel took it.
fn gso_send(socket: &std::net::UdpSocket, dst: SocketAddr, run: &[u8], segment: u16) -> bool {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
    let iov = [io::IoSlice::new(run)];
    let to = SockaddrStorage::from(dst);
    retried_once(|| {
        sendmsg(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&to),
        )
        .map(|_| ())
        .map_err(io::Error::from)
    })
    .is_ok()
}

/// `send`, once more if it failed on an ICMP error about an earlier datagram.
fn retried_once(send: impl Fn() -> io::Result<()>) -> io::Result<()> {
    match send() {
        Err(e) if is_deferred_icmp_error(&e) => send(),
        other => other,
    }
}

/// Errors Linux reports on a UDP socket for an ICMP message about an earlier datagram.
pub fn is_deferred_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// Where the driver puts the QUIC datagrams it receives on the shared socket.
#[derive(Clone, Debug)]
pub struct QuicInbox {
    tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

impl QuicInbox {
    /// Hands one datagram to the QUIC endpoint; drops it when the endpoint is behind.
    pub fn deliver(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        self.tx.try_send((from, datagram.to_vec())).is_ok()
    }
}

/// quinn's view of the shared socket: sends go straight out, receives come from the inbox.
pub struct QuicSocket {
    port: UdpPort,
    rx: Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
}

impl fmt::Debug for QuicSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicSocket")
            .field("port", &self.port)
            .finish()
    }
}

#[derive(Debug)]
struct Writable {
    port: UdpPort,
}

impl quinn::UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.port.inner.io.poll_send_ready(cx)
    }
}

impl quinn::AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable {
            port: self.port.clone(),
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let inner = &self.port.inner;
        let sourced;
        let transmit = match self.port.source_for(canonical_addr(transmit.destination)) {
            Some(src) if transmit.src_ip.is_none() => {
                sourced = Transmit {
                    src_ip: Some(src),
                    ..*transmit
                };
                &sourced
            }
            _ => transmit,
        };
        inner.io.try_io(Interest::WRITABLE, || {
            inner.state.send((&inner.io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut rx) = self.rx.lock() else {
            return Poll::Ready(Err(io::Error::other("quic inbox lock poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let next = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    // The receive loop stopped: the node is shutting down and drops the endpoint
                    // next. Nothing more will arrive; that is not an error worth reporting.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            let (from, data) = next;
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr: self.port.socket_form(from),
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.port.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.port.max_gso_segments()
    }

    fn may_fragment(&self) -> bool {
        self.port.inner.state.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsFd;

    /// A GSO batch on a plain socket arrives as the datagrams it holds, in order and whole (the
    /// last one shorter), and so does a lone datagram; the count says how many went.
    #[test]
    fn send_plain_delivers_every_datagram_of_a_batch() {
        let rx = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        // (Room for all of them before the test reads: 4 MiB as root, rmem_max otherwise.)
        size_buffers(&rx, 4 << 20);
        let tx = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        tx.set_nonblocking(true).unwrap();
        let dst = rx.local_addr().unwrap();
        // 130 datagrams of 500 bytes and one of 300: three GSO runs (64, 64, 3).
        let mut contents = Vec::new();
        for i in 0..130u32 {
            contents.extend((0..500u32).map(|j| (i * 7 + j) as u8));
        }
        contents.extend([0xee; 300]);
        assert_eq!(send_plain(&tx, dst, &contents, Some(500)), 131);
        let mut buf = [0u8; 2000];
        for (i, want) in contents.chunks(500).enumerate() {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want, "datagram {i}");
        }
        assert_eq!(send_plain(&tx, dst, b"lone", None), 1);
        assert_eq!(send_plain(&tx, dst, b"one segment", Some(500)), 1);
        for want in [&b"lone"[..], b"one segment"] {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
    }

    /// What arrives of a primer: its bytes, with the TTL it was given (the receiver asks the
    /// kernel for each datagram's TTL), while an ordinary send on the same socket keeps the
    /// default.
    #[tokio::test]
    async fn a_primer_leaves_with_its_own_ttl_and_the_socket_keeps_the_default() {
        let port = UdpPort::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt(&rx.as_fd(), sockopt::Ipv4RecvTtl, &true).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let received_ttl = || {
            let mut buf = [0u8; 64];
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!(i32);
            let msg = recvmsg::<()>(
                std::os::fd::AsRawFd::as_raw_fd(&rx),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            let ttl = msg.cmsgs().unwrap().find_map(|c| match c {
                ControlMessageOwned::Ipv4Ttl(t) => Some(t),
                _ => None,
            });
            (msg.bytes, ttl)
        };
        port.send_with_ttl(to, b"primer", 2).await.unwrap();
        assert_eq!(received_ttl(), (6, Some(2)));
        let batch = Batch {
            dst: to,
            contents: b"plain",
            segment_size: None,
        };
        port.send(&batch).await.unwrap();
        let (len, ttl) = received_ttl();
        assert_eq!(len, 5);
        assert_eq!(ttl, Some(64), "the socket's default TTL is untouched");
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert!(port.send_with_ttl(v6, b"x", 2).await.is_err());
    }

    /// One dual-stack socket talks to both families: an IPv4 sender is seen as a plain IPv4
    /// address, a reply goes back to it, and primers carry their TTL (hop limit) either way.
    #[tokio::test]
    async fn a_dual_stack_socket_serves_both_families_with_plain_addresses() {
        let Ok(port) = UdpPort::bind("[::]:0".parse().unwrap()) else {
            eprintln!("no IPv6 in this kernel: nothing to check");
            return;
        };
        let me = port.local_addr().unwrap().port();
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        setsockopt(&v4.as_fd(), sockopt::Ipv4RecvTtl, &true).unwrap();
        setsockopt(&v6.as_fd(), sockopt::Ipv6RecvHopLimit, &true).unwrap();
        for s in [&v4, &v6] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }
        let mut buf = vec![0u8; 2048];
        let mut meta = [RecvMeta::default()];
        for (peer, to) in [(&v4, "127.0.0.1"), (&v6, "::1")] {
            let to: std::net::IpAddr = to.parse().unwrap();
            peer.send_to(b"hello", (to, me)).unwrap();
            let n = {
                let mut slices = [IoSliceMut::new(&mut buf)];
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    port.recv(&mut slices, &mut meta),
                )
                .await
                .unwrap()
                .unwrap()
            };
            assert_eq!(n, 1);
            assert_eq!(
                meta[0].addr,
                peer.local_addr().unwrap(),
                "the sender's own form"
            );
            let batch = Batch {
                dst: meta[0].addr,
                contents: b"reply",
                segment_size: None,
            };
            port.send(&batch).await.unwrap();
            let mut got = [0u8; 16];
            let (len, from) = peer.recv_from(&mut got).unwrap();
            assert_eq!(&got[..len], b"reply");
            assert_eq!(from.port(), me);
            port.send_with_ttl(meta[0].addr, b"primer", 3)
                .await
                .unwrap();
            let mut b = [0u8; 64];
            let mut iov = [io::IoSliceMut::new(&mut b)];
            let mut space = nix::cmsg_space!(i32);
            let msg = recvmsg::<()>(
                std::os::fd::AsRawFd::as_raw_fd(peer),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            let ttl = msg.cmsgs().unwrap().find_map(|c| match c {
                ControlMessageOwned::Ipv4Ttl(t) => Some(t),
                ControlMessageOwned::Ipv6HopLimit(t) => Some(t),
                _ => None,
            });
            assert_eq!((msg.bytes, ttl), (6, Some(3)), "primer to {to}");
        }
    }
}
