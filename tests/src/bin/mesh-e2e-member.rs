//! `mesh-e2e-member KEY_FILE PEER_KEY PEER_ADDR:PORT BIND_ADDR:PORT SRC_IP DST_IP... `: a
//! member that crafts its own packets. With a node's own key (read from its state directory
//! while its agent is stopped), it completes a WireGuard handshake with the peer, then sends
//! one ICMP echo request from SRC_IP (its overlay address) to each DST_IP, five times each, and
//! reports, one line per DST_IP, whether an echo reply came back through the tunnel:
//! `DST_IP replies=N`. The end-to-end tests use it to show that a node does not forward what a
//! member addresses to anything but the node itself.

#![allow(clippy::print_stdout)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

fn key(text: &str) -> Result<[u8; 32], String> {
    STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("not a base64 x25519 key: {text:?}"))
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20] = 8; // echo request
    p[24..26].copy_from_slice(&0x6d65u16.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    let sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn run(args: &[String]) -> Result<(), String> {
    let [key_file, peer_key, peer, bind, src, dsts @ ..] = args else {
        return Err(
            "usage: mesh-e2e-member KEY_FILE PEER_KEY PEER_ADDR:PORT BIND_ADDR:PORT SRC_IP DST_IP..."
                .into(),
        );
    };
    let secret = key(&std::fs::read_to_string(key_file).map_err(|e| e.to_string())?)?;
    let peer_key = key(peer_key)?;
    let peer: SocketAddr = peer.parse().map_err(|e| format!("{peer}: {e}"))?;
    let src: Ipv4Addr = src.parse().map_err(|e| format!("{src}: {e}"))?;
    let dsts: Vec<Ipv4Addr> = dsts
        .iter()
        .map(|d| d.parse().map_err(|e| format!("{d}: {e}")))
        .collect::<Result<_, _>>()?;
    let socket = UdpSocket::bind(bind.as_str()).map_err(|e| format!("bind {bind}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut tunn = Tunn::new(
        StaticSecret::from(secret),
        PublicKey::from(peer_key),
        None,
        None,
        0x4242,
        None,
    );
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];

    // Handshake, retried like WireGuard until a session exists.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last_init = None::<Instant>;
    while tunn.stats().0.is_none() {
        if Instant::now() > deadline {
            return Err("no handshake with the peer within 15 s".into());
        }
        if last_init.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            if let TunnResult::WriteToNetwork(b) = tunn.format_handshake_initiation(&mut out, true)
            {
                socket.send_to(b, peer).map_err(|e| e.to_string())?;
            }
            last_init = Some(Instant::now());
        }
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let TunnResult::WriteToNetwork(b) =
                tunn.decapsulate(Some(from.ip()), &buf[..n], &mut out)
            {
                socket.send_to(b, peer).map_err(|e| e.to_string())?;
            }
        }
    }

    let mut replies = vec![0u32; dsts.len()];
    for seq in 0..5u16 {
        for dst in &dsts {
            let ping = echo_request(src, *dst, seq);
            if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(&ping, &mut out) {
                socket.send_to(b, peer).map_err(|e| e.to_string())?;
            }
        }
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let mut result = tunn.decapsulate(Some(from.ip()), &buf[..n], &mut out);
            loop {
                match result {
                    TunnResult::WriteToNetwork(b) => {
                        socket.send_to(b, peer).map_err(|e| e.to_string())?;
                    }
                    TunnResult::WriteToTunnelV4(p, _) if p.len() >= 28 && p[20] == 0 => {
                        let from = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                        if let Some(i) = dsts.iter().position(|d| *d == from) {
                            replies[i] += 1;
                        }
                        break;
                    }
                    _ => break,
                }
                result = tunn.decapsulate(None::<IpAddr>, &[], &mut out);
            }
        }
    }
    for (dst, n) in dsts.iter().zip(&replies) {
        println!("{dst} replies={n}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-e2e-member: {e}");
            ExitCode::FAILURE
        }
    }
}
