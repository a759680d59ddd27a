//! `mesh-handshake-flood`: a stranger's WireGuard handshake-initiation flood, for
//! `benches/handshake_flood.sh`.
//!
//! It knows the victim's public key (so every initiation carries a valid mac1, which is what an
//! attacker who read the key off a peer list can do), precomputes `--distinct` initiations from
//! random stranger keys (fresh ephemeral keys each, mac2 empty as from a sender that never got a
//! cookie), then sends them round-robin to `--target` for `--seconds`, as fast as it can or at
//! `--rate` datagrams per second. It never answers a cookie reply (a careless or spoofing
//! flooder); it counts what comes back. The last line of its output is one JSON object.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use boringtun::noise::{Tunn, TunnResult};
use clap::Parser;
use mesh_proto::PublicKey;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

/// Initiations made from one stranger key (each with its own ephemeral key).
const PER_KEY: usize = 16;

#[derive(Parser)]
#[command(about = "Flood a mesh node with handshake initiations from random stranger keys")]
struct Args {
    /// The victim's WireGuard public key (base64, as `mesh status --json` prints peer keys).
    #[arg(long)]
    key: PublicKey,
    /// The victim's UDP address.
    #[arg(long)]
    target: SocketAddr,
    /// How long to send.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Datagrams per second; 0 sends as fast as the socket takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Distinct initiations to precompute and cycle through.
    #[arg(long, default_value_t = 4096)]
    distinct: usize,
}

fn initiations(victim: XPublic, n: usize) -> anyhow::Result<Vec<[u8; 148]>> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    let mut index = 1u32;
    while out.len() < n {
        let stranger = StaticSecret::random_from_rng(rand::thread_rng());
        let mut tunn = Tunn::new(stranger, victim, None, None, index & 0x00ff_ffff, None);
        index += 1;
        for _ in 0..PER_KEY.min(n - out.len()) {
            match tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(b) if b.len() == 148 => {
                    let mut init = [0u8; 148];
                    init.copy_from_slice(b);
                    out.push(init);
                }
                other => anyhow::bail!("boringtun made no initiation: {other:?}"),
            }
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.distinct > 0, "--distinct must be at least 1");
    let started = Instant::now();
    let inits = initiations(XPublic::from(args.key.0), args.distinct)?;
    eprintln!(
        "precomputed {} initiations in {:.2}s",
        inits.len(),
        started.elapsed().as_secs_f64()
    );

    let socket = UdpSocket::bind("0.0.0.0:0").context("cannot bind a UDP socket")?;
    socket
        .connect(args.target)
        .with_context(|| format!("cannot connect the UDP socket to {}", args.target))?;
    let rx_socket = socket.try_clone()?;
    rx_socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let done = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let cookies = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (done, replies, cookies) = (done.clone(), replies.clone(), cookies.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = rx_socket.recv(&mut buf) {
                    replies.fetch_add(1, Ordering::Relaxed);
                    if n == 64 && buf[..4] == [3, 0, 0, 0] {
                        cookies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let duration = Duration::from_secs_f64(args.seconds.max(0.0));
    let start = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut next = inits.iter().cycle();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        // Paced: send what is due by now, then nap briefly. Unpaced: batches of 64.
        let due = match args.rate {
            0 => sent + 64,
            r => (elapsed.as_secs_f64() * r as f64) as u64,
        };
        if due <= sent {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..due - sent {
            let Some(init) = next.next() else { break };
            match socket.send(init) {
                Ok(_) => sent += 1,
                // ICMP unreachable from an earlier datagram, a full buffer: go on.
                Err(_) => errors += 1,
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    println!(
        "{{\"sent\":{sent},\"send_errors\":{errors},\"seconds\":{secs:.3},\"rate\":{:.0},\"replies\":{},\"cookie_replies\":{}}}",
        sent as f64 / secs.max(1e-9),
        replies.load(Ordering::Relaxed),
        cookies.load(Ordering::Relaxed)
    );
    Ok(())
}
