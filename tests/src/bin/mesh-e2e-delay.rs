//! `mesh-e2e-delay LISTEN TARGET MILLIS`: a UDP forwarder that delays every datagram by MILLIS
//! each way. The lab kernel has no netem, so the end-to-end tests put a "far away" relay behind
//! this. Each client address gets its own upstream socket, so the target sees one peer per
//! client (as through a NAT). Runs until killed.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A datagram to send at `due` from `socket` to `to`.
struct Delayed {
    due: Instant,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = (|| -> Option<(SocketAddr, SocketAddr, u64)> {
        Some((
            args.first()?.parse().ok()?,
            args.get(1)?.parse().ok()?,
            args.get(2)?.parse().ok()?,
        ))
    })();
    let Some((listen, target, millis)) = parsed else {
        eprintln!("usage: mesh-e2e-delay LISTEN_ADDR:PORT TARGET_ADDR:PORT MILLIS");
        return ExitCode::from(2);
    };
    let delay = Duration::from_millis(millis);
    let front = match UdpSocket::bind(listen) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("cannot bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One sender thread sends everything in due order (delays are all equal, so FIFO is due
    // order).
    let (tx, rx) = mpsc::channel::<Delayed>();
    thread::spawn(move || {
        for d in rx {
            let now = Instant::now();
            if d.due > now {
                thread::sleep(d.due - now);
            }
            let _ = d.socket.send_to(&d.bytes, d.to);
        }
    });
    let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf) else {
            continue;
        };
        let up = {
            let mut map = upstreams.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&client) {
                Some(s) => s.clone(),
                None => {
                    let bind: SocketAddr = if target.ip().is_loopback() {
                        "127.0.0.1:0".parse().unwrap_or(listen)
                    } else {
                        "0.0.0.0:0".parse().unwrap_or(listen)
                    };
                    let Ok(s) = UdpSocket::bind(bind) else {
                        continue;
                    };
                    let s = Arc::new(s);
                    map.insert(client, s.clone());
                    // Answers from the target go back to this client, delayed too.
                    let (s2, front2, tx2) = (s.clone(), front.clone(), tx.clone());
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while let Ok((n, _)) = s2.recv_from(&mut buf) {
                            let d = Delayed {
                                due: Instant::now() + delay,
                                socket: front2.clone(),
                                to: client,
                                bytes: buf[..n].to_vec(),
                            };
                            if tx2.send(d).is_err() {
                                break;
                            }
                        }
                    });
                    s
                }
            }
        };
        let d = Delayed {
            due: Instant::now() + delay,
            socket: up,
            to: target,
            bytes: buf[..n].to_vec(),
        };
        if tx.send(d).is_err() {
            return ExitCode::FAILURE;
        }
    }
}
