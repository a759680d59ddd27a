//! The node's one UDP socket and the QUIC endpoint that rides on it.

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::sync::mpsc;

/// Most QUIC datagrams queued for the quinn endpoint before new ones are dropped (QUIC recovers).
pub const QUIC_INBOX: usize = 1024;

/// One UDP socket, shared by the data path (WireGuard) and the QUIC endpoint.
#[derive(Clone)]
pub struct UdpPort {
    inner: Arc<Inner>,
}

struct Inner {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
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
    /// Binds the socket. Must run inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpPort> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        let io = tokio::net::UdpSocket::from_std(std)?;
        Ok(UdpPort {
            inner: Arc::new(Inner { io, state }),
        })
    }

    /// Marks the socket's packets with [`crate::bypass::MARK`] so that they never enter the
    /// overlay. Fails without CAP_NET_ADMIN.
    pub fn set_bypass_mark(&self) -> io::Result<()> {
        crate::bypass::mark_socket(&self.inner.io)
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
                Ok(n) => return Ok(n),
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
        self.inner.io.try_io(Interest::READABLE, || {
            self.inner.state.recv((&self.inner.io).into(), bufs, meta)
        })
    }

    /// Sends one datagram or GSO batch, waiting for buffer space if needed. Send errors that
    /// concern one destination (unreachable, and so on) are returned for the caller to count.
    ///
    /// An ICMP error caused by an *earlier* datagram (a probe to a closed port, say) is reported
    /// by the kernel on the next send, which it fails without sending. That error is consumed
    /// by reporting it, so such a send is tried once more: one dead destination must not cost
    /// the datagram that happens to follow it.
    pub async fn send(&self, batch: &Batch<'_>) -> io::Result<()> {
        let t = Transmit {
            destination: batch.dst,
            ecn: None,
            contents: batch.contents,
            segment_size: batch.segment_size,
            src_ip: None,
        };
        let mut retried = false;
        loop {
            self.inner.io.writable().await?;
            match self.inner.io.try_io(Interest::WRITABLE, || {
                self.inner.state.send((&self.inner.io).into(), &t)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !retried && is_deferred_icmp_error(&e) => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one datagram to an IPv4 `dst` with IP TTL `ttl` (a primer), waiting for buffer
    /// space if needed, and leaving the socket's default TTL alone for everything else on it
    /// (QUIC included): the TTL travels with the datagram (an `IP_TTL` control message).
    pub async fn send_with_ttl(&self, dst: SocketAddr, contents: &[u8], ttl: u8) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
        use std::os::fd::AsRawFd;
        let SocketAddr::V4(v4) = dst else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TTL is set on IPv4 datagrams only",
            ));
        };
        let ttl = i32::from(ttl);
        let addr = SockaddrIn::from(v4);
        let iov = [io::IoSlice::new(contents)];
        let cmsg = [ControlMessage::Ipv4Ttl(&ttl)];
        let mut retried = false;
        loop {
            self.inner.io.writable().await?;
            match self.inner.io.try_io(Interest::WRITABLE, || {
                let fd = self.inner.io.as_raw_fd();
                sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&addr))
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
                addr: from,
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
}
