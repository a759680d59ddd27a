//! `mesh-e2e-stream`: one TCP connection carrying a deterministic byte pattern, checked byte by
//! byte at the far end, to see that a stream survives path changes whole.
//!
//! - `mesh-e2e-stream recv PORT`: prints `listening PORT`, accepts one connection, and checks
//!   every byte against the pattern. While data arrives it prints `at UNIX_MS TOTAL` at most
//!   every 10 ms (and always for the first arrival after a pause of 100 ms or more), so a test
//!   can see when the stream stalled and when it moved again. At the end of the stream it prints
//!   `done TOTAL CHECKSUM` and exits 0; on a wrong byte, `mismatch at OFFSET: got X, expected
//!   Y`, on a socket error (a reset), `error after TOTAL bytes: ...`, and exits 1.
//! - `mesh-e2e-stream send ADDR:PORT BYTES_PER_SEC STOP_FILE`: sends the pattern at about that
//!   rate until `STOP_FILE` exists, then closes its side, waits for the receiver to close, prints
//!   `sent TOTAL CHECKSUM` and exits 0; on a socket error it prints `error after TOTAL bytes:
//!   ...` and exits 1.
//!
//! The pattern: byte `i` is byte `i % 8` (little-endian) of `splitmix64(i / 8)`. The checksum is
//! 64-bit FNV-1a over the whole stream.

// This tool's output on stdout is its result, printed on purpose.
#![allow(clippy::print_stdout)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes per write.
const CHUNK: usize = 16 * 1024;
/// How often the receiver reports progress at most.
const REPORT_EVERY: Duration = Duration::from_millis(10);
/// A pause in arrivals after which the next arrival is always reported.
const PAUSE: Duration = Duration::from_millis(100);

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern starting at stream offset `offset`.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = splitmix64(pos / 8).to_le_bytes()[(pos % 8) as usize];
    }
}

/// 64-bit FNV-1a, fed in pieces.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn recv(port: u16) -> ExitCode {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            println!("error: cannot listen on TCP port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening {port}");
    let mut conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) => {
            println!("error: accept: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; buf.len()];
    let mut total: u64 = 0;
    let mut sum = Fnv::new();
    let mut last_report: Option<Instant> = None;
    let mut last_arrival = Instant::now();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                println!("error after {total} bytes: {e}");
                return ExitCode::FAILURE;
            }
        };
        pattern(total, &mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            println!(
                "mismatch at {}: got {:#04x}, expected {:#04x}",
                total + i as u64,
                buf[i],
                want[i]
            );
            return ExitCode::FAILURE;
        }
        sum.update(&buf[..n]);
        total += n as u64;
        let now = Instant::now();
        let paused = now.duration_since(last_arrival) >= PAUSE;
        last_arrival = now;
        if paused || last_report.is_none_or(|t| now.duration_since(t) >= REPORT_EVERY) {
            println!("at {} {total}", unix_ms());
            last_report = Some(now);
        }
    }
    println!("at {} {total}", unix_ms());
    // Closing our side tells the sender that everything arrived.
    let _ = conn.shutdown(Shutdown::Both);
    println!("done {total} {:016x}", sum.0);
    ExitCode::SUCCESS
}

fn send(to: SocketAddr, rate: u64, stop: &Path) -> ExitCode {
    let mut conn = match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            println!("error: cannot connect to {to}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    let mut sum = Fnv::new();
    // Pacing: `total` should be about `rate * elapsed`; after a stall the sender does not try to
    // make up for more than a tenth of a second.
    let mut start = Instant::now();
    while !stop.exists() {
        let due = (rate as f64 * start.elapsed().as_secs_f64()) as u64;
        if total >= due {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if due - total > rate / 10 + CHUNK as u64 {
            // Restart the schedule from where we are.
            start = Instant::now() - Duration::from_secs_f64(total as f64 / rate as f64);
        }
        pattern(total, &mut buf);
        if let Err(e) = conn.write_all(&buf) {
            println!("error after {total} bytes: {e}");
            return ExitCode::FAILURE;
        }
        sum.update(&buf);
        total += buf.len() as u64;
    }
    if let Err(e) = conn.shutdown(Shutdown::Write) {
        println!("error after {total} bytes: closing: {e}");
        return ExitCode::FAILURE;
    }
    // Wait for the receiver's close (it closes after reading everything).
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut rest = [0u8; 16];
    match conn.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => {
            println!("error after {total} bytes: the receiver sent data");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            println!("error after {total} bytes: waiting for the receiver to close: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("sent {total} {:016x}", sum.0);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!(
            "usage: mesh-e2e-stream recv PORT | mesh-e2e-stream send ADDR:PORT BYTES_PER_SEC STOP_FILE"
        );
        ExitCode::from(2)
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["recv", port] => match port.parse() {
            Ok(p) => recv(p),
            Err(_) => usage(),
        },
        ["send", to, rate, stop] => match (to.parse(), rate.parse::<u64>()) {
            (Ok(to), Ok(rate)) if rate > 0 => send(to, rate, Path::new(stop)),
            _ => usage(),
        },
        _ => usage(),
    }
}
