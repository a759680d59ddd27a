//! `mesh-e2e-udp ADDR:PORT HEX...`: sends each HEX argument as one UDP datagram to ADDR:PORT.
//! Run inside a namespace by the end-to-end tests to throw malformed packets at a daemon.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((to, payloads)) = args.split_first() else {
        eprintln!("usage: mesh-e2e-udp ADDR:PORT HEX...");
        return ExitCode::from(2);
    };
    let to: SocketAddr = match to.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {to:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot bind a UDP socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    for p in payloads {
        let Some(bytes) = decode_hex(p) else {
            eprintln!("not hex: {p:?}");
            return ExitCode::from(2);
        };
        if let Err(e) = socket.send_to(&bytes, to) {
            eprintln!("sending {} bytes to {to}: {e}", bytes.len());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
