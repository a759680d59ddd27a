//! `mesh-e2e-tundelay IFNAME MILLIS`: a TUN device that hands every packet the kernel routes
//! into it back to the kernel MILLIS ms later, as if it had arrived on IFNAME. The lab kernel has
//! no netem; the NAT lab's IPv6 delay box ([`mesh_e2e::natlab::NatLab::delay_ipv6`]) routes
//! the packets to delay into IFNAME and routes what comes out of it (`iif IFNAME`, another
//! table) on to their destination.
//!
//! Prints `ready IFNAME` once the device exists (the caller sets it up), then runs until
//! killed. Exit codes: 1 the device could not be made, 2 bad usage.

// This tool's output on stdout is its result, printed on purpose.
#![allow(clippy::print_stdout)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// `_IOW('T', 202, int)`: attach the open `/dev/net/tun` to an interface.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens `/dev/net/tun` as the TUN device `name` (no packet information header).
fn open_tun(name: &str) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "bad interface name {name:?}"
        )));
    }
    let mut req = [0u8; 40];
    req[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    req[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `req` is a zeroed `struct ifreq` (40 bytes on Linux) with the name and the flags
    // in place; the kernel reads and writes only within it, and `file` stays open meanwhile.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(Ok(millis))) = (args.first(), args.get(1).map(|m| m.parse::<u64>()))
    else {
        eprintln!("usage: mesh-e2e-tundelay IFNAME MILLIS");
        return ExitCode::from(2);
    };
    let delay = Duration::from_millis(millis);
    let mut tun = match open_tun(name) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot make TUN device {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = match tun.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot duplicate the TUN descriptor: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready {name}");
    let _ = std::io::stdout().flush();
    // Every packet is held the same time, so first in is first due.
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        for (due, packet) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            let _ = out.write(&packet);
        }
    });
    let mut buf = vec![0u8; 65536];
    loop {
        match tun.read(&mut buf) {
            Ok(0) => continue,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return ExitCode::FAILURE;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("reading {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}
