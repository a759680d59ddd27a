//! Per-packet cost of mesh's data path against raw boringtun, in the same run.
//!
//! - `boringtun`: two `Tunn`s with an established session; encapsulate on one side, decapsulate
//!   on the other. The baseline.
//! - `mesh_core`: two `mesh_core::Node`s; a TUN packet goes in on one side (routing, encryption,
//!   transmit queue) and comes out of the other (demux by index, decryption, source check).
//!
//! The ratio mesh_core / boringtun is the cost of mesh's own work around WireGuard.

#![allow(clippy::unwrap_used)]

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_core::{Node, NodeConfig, PeerConfig, Source};
use mesh_proto::PublicKey;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

const PAYLOAD: usize = 1400;

fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p
}

fn boringtun_pair() -> (Tunn, Tunn) {
    let sa = StaticSecret::from([1u8; 32]);
    let sb = StaticSecret::from([2u8; 32]);
    let pa = XPublic::from(&sa);
    let pb = XPublic::from(&sb);
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    if let TunnResult::WriteToNetwork(p) = a.decapsulate(None, &resp, &mut buf) {
        // Keepalive confirming the session to the responder.
        let k = p.to_vec();
        let _ = b.decapsulate(None, &k, &mut buf2);
    }
    (a, b)
}

fn node_pair() -> (Node, Node, SocketAddr, SocketAddr) {
    let now = Instant::now();
    let ka = [1u8; 32];
    let kb = [2u8; 32];
    let pa = PublicKey(XPublic::from(&StaticSecret::from(ka)).to_bytes());
    let pb = PublicKey(XPublic::from(&StaticSecret::from(kb)).to_bytes());
    let ea: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let eb: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let ia = Ipv4Addr::new(100, 64, 0, 1);
    let ib = Ipv4Addr::new(100, 64, 0, 2);
    let mut a = Node::new(
        NodeConfig {
            private_key: ka,
            address: ia,
            keepalive: None,
            mtu: 1420,
        },
        1,
        now,
    );
    let mut b = Node::new(
        NodeConfig {
            private_key: kb,
            address: ib,
            keepalive: None,
            mtu: 1420,
        },
        2,
        now,
    );
    a.set_peers(
        &[PeerConfig {
            key: pb,
            name: "b".into(),
            address: ib,
            endpoints: vec![eb],
            observed: None,
        }],
        now,
    );
    b.set_peers(
        &[PeerConfig {
            key: pa,
            name: "a".into(),
            address: ia,
            endpoints: vec![ea],
            observed: None,
        }],
        now,
    );
    // Establish the session in both directions.
    for (x, y) in [(ia, ib), (ib, ia)] {
        let (from, to) = if x == ia {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        from.handle_tun_packet(&packet(x, y), now);
        for _ in 0..4 {
            while let Some(t) = from.poll_transmit() {
                let src = Source::main(if x == ia { ea } else { eb });
                for d in t.segments() {
                    to.handle_datagram(src, d, now);
                }
            }
            while let Some(t) = to.poll_transmit() {
                let src = Source::main(if x == ia { eb } else { ea });
                for d in t.segments() {
                    from.handle_datagram(src, d, now);
                }
            }
        }
        while to.poll_tun_packet().is_some() {}
    }
    (a, b, ea, eb)
}

fn datapath(c: &mut Criterion) {
    let mut g = c.benchmark_group("one_packet_1400B");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));

    let (mut ta, mut tb) = boringtun_pair();
    let pkt = packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
    let mut enc = vec![0u8; 2048];
    let mut dec = vec![0u8; 2048];
    g.bench_function("boringtun", |bench| {
        bench.iter(|| {
            let n = match ta.encapsulate(black_box(&pkt), &mut enc) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => panic!("encapsulate"),
            };
            match tb.decapsulate(None, &enc[..n], &mut dec) {
                TunnResult::WriteToTunnelV4(p, _) => black_box(p.len()),
                _ => panic!("decapsulate"),
            }
        })
    });

    let (mut a, mut b, ea, _) = node_pair();
    let now = Instant::now();
    g.bench_function("mesh_core", |bench| {
        bench.iter(|| {
            // The driver gives both buffers back, as the agent's data plane does.
            a.handle_tun_packet(black_box(&pkt), now);
            let t = a.poll_transmit().unwrap();
            b.handle_datagram(Source::main(ea), &t.contents, now);
            a.recycle(t.contents);
            let p = b.poll_tun_packet().unwrap();
            black_box(p.len());
            b.recycle(p);
        })
    });
    g.finish();
}

criterion_group!(benches, datapath);
criterion_main!(benches);
