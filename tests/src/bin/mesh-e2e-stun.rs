//! `mesh-e2e-stun`: a tiny UDP reflector and prober that the NAT lab's tests use to check what a
//! router really does with UDP (mappings and filtering). Not STUN the protocol: the payloads are
//! plain text (except `stun`).
//!
//! ```text
//! mesh-e2e-stun serve IP:PORT
//!     Answers every datagram with the sender's address as seen here ("IP:PORT"); prints
//!     "serving IP:PORT" once bound, then "from SRC" per datagram. Runs until killed.
//! mesh-e2e-stun probe --from PORT SERVER...
//!     From one UDP socket bound to 0.0.0.0:PORT, asks each SERVER (IP:PORT, in turn) what it
//!     sees and prints one line per server: "SERVER OBSERVED", or "SERVER none" when no answer
//!     came within 2 s (the request is repeated every 400 ms meanwhile).
//! mesh-e2e-stun listen PORT SECONDS [--ipv6] [--punch TO]...
//!     Binds 0.0.0.0:PORT ([::]:PORT with --ipv6), first sends one datagram to each TO (to open
//!     a NAT's or a firewall's filter), prints "listening LOCAL", then "from SRC PAYLOAD" for
//!     every datagram received during SECONDS, then exits 0.
//! mesh-e2e-stun send --from PORT TO [TEXT]
//!     Sends one datagram (TEXT, default "mesh-e2e-stun") from 0.0.0.0:PORT (or [::]:PORT when
//!     TO is an IPv6 address) to TO.
//! mesh-e2e-stun stun IP:PORT
//!     A STUN server (RFC 5389 binding requests only): answers each request from the same
//!     socket with the sender's address (XOR-MAPPED-ADDRESS), whatever attributes it carries
//!     (a CHANGE-REQUEST is answered from here too). Prints "serving IP:PORT" once bound, then
//!     "from SRC" per request. For routers that look up their own public address (miniupnpd's
//!     ext_perform_stun). Runs until killed.
//! ```
//!
//! Exit codes: 0 done, 1 a socket error, 2 bad usage.

// This tool's output on stdout is its result, printed on purpose.
#![allow(clippy::print_stdout)]

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long `probe` waits for each server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often `probe` repeats its request while it waits.
const PROBE_RESEND: Duration = Duration::from_millis(400);

const USAGE: &str = "usage:
  mesh-e2e-stun serve IP:PORT
  mesh-e2e-stun probe --from PORT SERVER...
  mesh-e2e-stun listen PORT SECONDS [--ipv6] [--punch TO]...
  mesh-e2e-stun send --from PORT TO [TEXT]
  mesh-e2e-stun stun IP:PORT";

/// Why the command failed: bad usage (exit 2) or an I/O error (exit 1).
enum Failure {
    Usage(String),
    Io(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((cmd, rest)) => match cmd.as_str() {
            "serve" => serve(rest),
            "probe" => probe(rest),
            "listen" => listen(rest),
            "send" => send(rest),
            "stun" => stun(rest),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(Failure::Usage(format!("unknown command {other:?}"))),
        },
        None => Err(Failure::Usage("no command given".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("mesh-e2e-stun: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Io(msg)) => {
            eprintln!("mesh-e2e-stun: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, Failure> {
    s.parse()
        .map_err(|e| Failure::Usage(format!("bad address {s:?} (want IP:PORT): {e}")))
}

fn parse_port(s: &str) -> Result<u16, Failure> {
    s.parse()
        .map_err(|e| Failure::Usage(format!("bad port {s:?}: {e}")))
}

/// Splits a leading `--from PORT` off `args`.
fn take_from(args: &[String]) -> Result<(u16, &[String]), Failure> {
    match args {
        [flag, port, rest @ ..] if flag == "--from" => Ok((parse_port(port)?, rest)),
        _ => Err(Failure::Usage("expected --from PORT".into())),
    }
}

fn bind(addr: SocketAddr) -> Result<UdpSocket, Failure> {
    UdpSocket::bind(addr).map_err(|e| Failure::Io(format!("cannot bind {addr}: {e}")))
}

fn bind_port(port: u16) -> Result<UdpSocket, Failure> {
    bind(SocketAddr::from(([0, 0, 0, 0], port)))
}

/// Binds `[::]:port` (IPv6, and IPv4 as mapped addresses).
fn bind_port6(port: u16) -> Result<UdpSocket, Failure> {
    bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
}

fn send_to(socket: &UdpSocket, payload: &[u8], to: SocketAddr) -> Result<(), Failure> {
    socket
        .send_to(payload, to)
        .map(|_| ())
        .map_err(|e| Failure::Io(format!("sending to {to}: {e}")))
}

fn flush() {
    let _ = std::io::stdout().flush();
}

/// A read timeout or an ICMP error reported on the socket: both mean "nothing (good) arrived".
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::ConnectionRefused
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::Interrupted
    )
}

/// Binds the one IP:PORT in `args` (`command` names the subcommand in the usage error) and
/// says so on stdout, which the lab waits for.
fn bind_announced(command: &str, args: &[String]) -> Result<UdpSocket, Failure> {
    let [addr] = args else {
        return Err(Failure::Usage(format!("{command} takes one IP:PORT")));
    };
    let socket = bind(parse_addr(addr)?)?;
    let local = socket
        .local_addr()
        .map_err(|e| Failure::Io(format!("local address: {e}")))?;
    println!("serving {local}");
    flush();
    Ok(socket)
}

fn serve(args: &[String]) -> Result<(), Failure> {
    let socket = bind_announced("serve", args)?;
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, src)) => {
                println!("from {src}");
                flush();
                // A failed answer (e.g. no route back) must not stop the reflector.
                if let Err(e) = socket.send_to(src.to_string().as_bytes(), src) {
                    eprintln!("mesh-e2e-stun: answering {src}: {e}");
                }
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(Failure::Io(format!("receiving: {e}"))),
        }
    }
}

fn probe(args: &[String]) -> Result<(), Failure> {
    let (port, servers) = take_from(args)?;
    if servers.is_empty() {
        return Err(Failure::Usage("probe needs at least one SERVER".into()));
    }
    let servers = servers
        .iter()
        .map(|s| parse_addr(s))
        .collect::<Result<Vec<_>, _>>()?;
    let socket = bind_port(port)?;
    for server in servers {
        let observed = ask(&socket, server)?;
        match observed {
            Some(o) => println!("{server} {o}"),
            None => println!("{server} none"),
        }
        flush();
    }
    Ok(())
}

/// Asks `server` what it sees, repeating the request every [`PROBE_RESEND`], for at most
/// [`PROBE_TIMEOUT`]. Datagrams from anyone else, or that are not an address, are ignored.
fn ask(socket: &UdpSocket, server: SocketAddr) -> Result<Option<SocketAddr>, Failure> {
    let start = Instant::now();
    let deadline = start + PROBE_TIMEOUT;
    let mut next_send = start;
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now >= next_send {
            // An ICMP error from an earlier send can surface here; the next try is the retry.
            if let Err(e) = socket.send_to(b"probe", server) {
                if !is_transient(&e) {
                    return Err(Failure::Io(format!("sending to {server}: {e}")));
                }
            }
            next_send = now + PROBE_RESEND;
        }
        let wait = next_send
            .min(deadline)
            .saturating_duration_since(Instant::now());
        socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| Failure::Io(format!("setting a read timeout: {e}")))?;
        match socket.recv_from(&mut buf) {
            Ok((n, src)) if src == server => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Ok(observed) = text.trim().parse::<SocketAddr>() {
                    return Ok(Some(observed));
                }
            }
            Ok(_) => {}
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(Failure::Io(format!("receiving: {e}"))),
        }
    }
}

fn listen(args: &[String]) -> Result<(), Failure> {
    let [port, seconds, rest @ ..] = args else {
        return Err(Failure::Usage("listen takes PORT SECONDS".into()));
    };
    let port = parse_port(port)?;
    let seconds: u64 = seconds
        .parse()
        .map_err(|e| Failure::Usage(format!("bad SECONDS {seconds:?}: {e}")))?;
    let mut punch = Vec::new();
    let (v6, mut rest) = match rest {
        [flag, tail @ ..] if flag == "--ipv6" => (true, tail),
        _ => (false, rest),
    };
    while let [flag, to, tail @ ..] = rest {
        if flag != "--punch" {
            break;
        }
        punch.push(parse_addr(to)?);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(Failure::Usage(format!("unexpected arguments {rest:?}")));
    }
    let socket = if v6 {
        bind_port6(port)?
    } else {
        bind_port(port)?
    };
    for to in punch {
        send_to(&socket, b"punch", to)?;
    }
    let local = socket
        .local_addr()
        .map_err(|e| Failure::Io(format!("local address: {e}")))?;
    println!("listening {local}");
    flush();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| Failure::Io(format!("setting a read timeout: {e}")))?;
        match socket.recv_from(&mut buf) {
            Ok((n, src)) => {
                let text: String = String::from_utf8_lossy(&buf[..n])
                    .chars()
                    .map(|c| if c.is_control() { '.' } else { c })
                    .collect();
                println!("from {src} {text}");
                flush();
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(Failure::Io(format!("receiving: {e}"))),
        }
    }
}

fn send(args: &[String]) -> Result<(), Failure> {
    let (port, rest) = take_from(args)?;
    let (to, text) = match rest {
        [to] => (to, "mesh-e2e-stun"),
        [to, text] => (to, text.as_str()),
        _ => return Err(Failure::Usage("send takes --from PORT TO [TEXT]".into())),
    };
    let to = parse_addr(to)?;
    let socket = if to.is_ipv6() {
        bind_port6(port)?
    } else {
        bind_port(port)?
    };
    send_to(&socket, text.as_bytes(), to)
}

/// STUN's magic cookie (RFC 5389), also the key of the XOR-MAPPED-ADDRESS.
const MAGIC_COOKIE: u32 = 0x2112_a442;

/// The answer to a STUN binding request `request` from `src`, or `None` if it is not one (too
/// short, another message type, no magic cookie, or IPv6).
fn stun_answer(request: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
    let header = request.get(..20)?;
    if header[..2] != [0x00, 0x01] || header[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return None;
    }
    let SocketAddr::V4(src) = src else {
        return None;
    };
    let mut answer = Vec::with_capacity(32);
    // Binding success response, 12 bytes of attributes, the request's cookie and id.
    answer.extend_from_slice(&[0x01, 0x01, 0x00, 0x0c]);
    answer.extend_from_slice(&header[4..20]);
    // XOR-MAPPED-ADDRESS: type, length 8, family IPv4, port and address XORed with the cookie.
    answer.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01]);
    let port = src.port() ^ ((MAGIC_COOKIE >> 16) as u16);
    answer.extend_from_slice(&port.to_be_bytes());
    answer.extend_from_slice(&(u32::from(*src.ip()) ^ MAGIC_COOKIE).to_be_bytes());
    Some(answer)
}

fn stun(args: &[String]) -> Result<(), Failure> {
    let socket = bind_announced("stun", args)?;
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, src)) => {
                let Some(answer) = stun_answer(&buf[..n], src) else {
                    continue;
                };
                println!("from {src}");
                flush();
                if let Err(e) = socket.send_to(&answer, src) {
                    eprintln!("mesh-e2e-stun: answering {src}: {e}");
                }
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(Failure::Io(format!("receiving: {e}"))),
        }
    }
}
