//! Sockets of both address families: servers and the agent listen on one dual-stack socket per
//! port where the host has IPv6 (IPv4 clients then show up as IPv4-mapped IPv6 addresses, which
//! [`canonical`] turns back into IPv4), and on IPv4 alone where the kernel has none.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// A UDP socket bound to `addr`. An unspecified IPv6 address (`[::]:port`) binds both families
/// whatever `net.ipv6.bindv6only` says; a specific IPv6 address binds IPv6 alone.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let SocketAddr::V6(v6) = addr {
        socket.set_only_v6(!v6.ip().is_unspecified())?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Bytes of kernel buffer a server's UDP socket asks for each way (the agent asks the same).
/// The default (208 KiB on Linux) overflows when a few thousand nodes join at once or a relay
/// forwards at a gigabit: a controller with 1,000 nodes joining dropped about 8,000 datagrams.
pub const SERVER_SOCKET_BUFFER: usize = 7 << 20;

/// What a socket holds after [`size_buffers`], in bytes each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub recv: usize,
    pub send: usize,
}

/// Asks the kernel for receive and send buffers of `want` bytes each on `socket`, which it
/// grants up to `net.core.rmem_max` and `wmem_max`. Returns what the socket holds now.
pub fn size_buffers(socket: &std::net::UdpSocket, want: usize) -> BufferSizes {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(want);
    let _ = sock.set_send_buffer_size(want);
    // Linux reports twice what it keeps for data (the rest is its bookkeeping).
    BufferSizes {
        recv: sock.recv_buffer_size().unwrap_or(0) / 2,
        send: sock.send_buffer_size().unwrap_or(0) / 2,
    }
}

/// `addr`, unless it is the unspecified IPv6 address and the kernel has no IPv6: then the same
/// port on the unspecified IPv4 address. `bind` runs once or twice.
pub fn with_ipv4_fallback<T>(
    addr: SocketAddr,
    bind: impl Fn(SocketAddr) -> io::Result<T>,
) -> io::Result<T> {
    match bind(addr) {
        Err(e) if addr.ip() == Ipv6Addr::UNSPECIFIED && ipv6_unavailable(&e) => {
            bind((Ipv4Addr::UNSPECIFIED, addr.port()).into())
        }
        other => other,
    }
}

/// Whether a failed IPv6 socket or bind means that the kernel has no IPv6 (booted with
/// `ipv6.disable=1`), so that IPv4 alone is the right fallback.
pub fn ipv6_unavailable(e: &io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    const EPROTONOSUPPORT: i32 = 93;
    matches!(
        e.raw_os_error(),
        Some(EAFNOSUPPORT | EADDRNOTAVAIL | EPROTONOSUPPORT)
    )
}

/// `addr` with an IPv4-mapped IPv6 address (how a dual-stack socket names an IPv4 peer) turned
/// back into the IPv4 one; other addresses unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The unspecified address of both families: `[::]:port`.
pub fn any(port: u16) -> SocketAddr {
    (Ipv6Addr::UNSPECIFIED, port).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_server_socket_gets_the_buffers_it_asks_for_within_the_kernel_limits() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let before = socket2::SockRef::from(&socket).recv_buffer_size().unwrap() / 2;
        let got = size_buffers(&socket, SERVER_SOCKET_BUFFER);
        // Linux grants up to the limit (and reports the doubled size halved back).
        let recv = SERVER_SOCKET_BUFFER.min(limit("rmem_max"));
        let send = SERVER_SOCKET_BUFFER.min(limit("wmem_max"));
        assert!(got.recv >= recv, "{got:?}, rmem_max allows {recv}");
        assert!(got.send >= send, "{got:?}, wmem_max allows {send}");
        assert!(got.recv >= before, "{got:?} < the default {before}");
    }

    #[test]
    fn an_unspecified_ipv6_bind_serves_ipv4_too_and_names_it_plainly() {
        let Ok(server) = bind_udp(any(0)) else {
            eprintln!("no IPv6 in this kernel: nothing to check");
            return;
        };
        let port = server.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", ("127.0.0.1", port)).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        assert!(from.is_ipv6(), "the kernel names it mapped: {from}");
        assert_eq!(canonical(from), client.local_addr().unwrap());
        let v6only = bind_udp("[::1]:0".parse().unwrap()).unwrap();
        assert!(socket2::SockRef::from(&v6only).only_v6().unwrap());
    }

    #[test]
    fn the_fallback_takes_ipv4_only_when_ipv6_is_missing() {
        let missing = || io::Error::from_raw_os_error(97);
        let got = with_ipv4_fallback(
            any(7443),
            |a| {
                if a.is_ipv6() {
                    Err(missing())
                } else {
                    Ok(a)
                }
            },
        )
        .unwrap();
        assert_eq!(got, "0.0.0.0:7443".parse().unwrap());
        let busy = with_ipv4_fallback(any(7443), |_| -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::AddrInUse))
        });
        assert_eq!(busy.unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }
}
