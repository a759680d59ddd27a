//! Microbenchmarks live in `benches/datapath.rs`; the end-to-end throughput bench is
//! `benches/tunnel.sh`. This library holds what the data-path bench and its instruction
//! counter (`mesh-datapath-count`, for `valgrind --tool=callgrind`) share: the same two pairs,
//! raw boringtun and two mesh nodes, and one round of each.

#![allow(clippy::unwrap_used)]

use boringtun::noise::{Tunn, TunnResult};
use mesh_core::{Node, NodeConfig, Output, PeerConfig, Source, Transmit, Unopened, Unsealed};
use mesh_proto::PublicKey;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

/// Size of the inner packet of one round.
pub const PAYLOAD: usize = 1400;

/// An IPv4/UDP packet of [`PAYLOAD`] bytes from `src` to `dst`.
pub fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PAYLOAD as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p
}

/// Two boringtun tunnels with an established session.
pub fn boringtun_pair() -> (Tunn, Tunn) {
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

/// Two mesh nodes with an established session both ways, and their underlay addresses.
pub fn node_pair() -> (Node, Node, SocketAddr, SocketAddr) {
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
            routes: Vec::new(),
            key: pb,
            name: "b".into(),
            address: ib,
            address6: None,
            endpoints: vec![eb],
            observed: None,
            nat: None,
        }],
        now,
    );
    b.set_peers(
        &[PeerConfig {
            routes: Vec::new(),
            key: pa,
            name: "a".into(),
            address: ia,
            address6: None,
            endpoints: vec![ea],
            observed: None,
            nat: None,
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

/// The raw boringtun pair and its buffers.
pub struct Raw {
    a: Tunn,
    b: Tunn,
    pkt: Vec<u8>,
    enc: Vec<u8>,
    dec: Vec<u8>,
}

impl Default for Raw {
    fn default() -> Self {
        let (a, b) = boringtun_pair();
        Raw {
            a,
            b,
            pkt: packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)),
            enc: vec![0u8; 2048],
            dec: vec![0u8; 2048],
        }
    }
}

impl Raw {
    /// One packet: encapsulated by one tunnel, decapsulated by the other.
    pub fn round(&mut self) -> usize {
        let n = match self.a.encapsulate(black_box(&self.pkt), &mut self.enc) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => panic!("encapsulate"),
        };
        match self.b.decapsulate(None, &self.enc[..n], &mut self.dec) {
            TunnResult::WriteToTunnelV4(p, _) => black_box(p.len()),
            _ => panic!("decapsulate"),
        }
    }
}

/// Two sessions of mesh's own WireGuard implementation (`mesh-wg`), made by its handshake.
pub struct Wg {
    a: mesh_wg::Transport,
    b: mesh_wg::Transport,
    pkt: Vec<u8>,
    buf: Vec<u8>,
}

impl Default for Wg {
    fn default() -> Self {
        let sa = mesh_wg::LocalKeys::new(StaticSecret::from([1u8; 32]));
        let sb = mesh_wg::LocalKeys::new(StaticSecret::from([2u8; 32]));
        let mut init = [0u8; mesh_wg::INITIATION_LEN];
        let initiated =
            mesh_wg::handshake::initiate(&sa, sb.public(), 1, [3; 32], [0; 12], &mut init).unwrap();
        let received = mesh_wg::handshake::receive_initiation(&sb, &init).unwrap();
        let mut resp = [0u8; mesh_wg::RESPONSE_LEN];
        let b = mesh_wg::handshake::respond(received, &[0; 32], 2, [4; 32], &mut resp).unwrap();
        let a = initiated.receive_response(&sa, &[0; 32], &resp).unwrap();
        Wg {
            a,
            b,
            pkt: packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)),
            buf: vec![0u8; 2048],
        }
    }
}

impl Wg {
    /// One packet: written behind room for the header (where a TUN read would put it), sealed
    /// there by one session, opened in place by the other.
    pub fn round(&mut self) -> usize {
        let len = self.pkt.len();
        self.buf[mesh_wg::DATA_HEADER_LEN..mesh_wg::DATA_HEADER_LEN + len]
            .copy_from_slice(black_box(&self.pkt));
        let n = self.a.seal(&mut self.buf, len).unwrap();
        black_box(self.b.open(&mut self.buf[..n]).unwrap().len())
    }
}

/// The mesh pair.
pub struct Mesh {
    a: Node,
    b: Node,
    ea: SocketAddr,
    pkt: Vec<u8>,
    now: Instant,
}

impl Default for Mesh {
    fn default() -> Self {
        let (a, b, ea, _) = node_pair();
        Mesh {
            a,
            b,
            ea,
            pkt: packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)),
            now: Instant::now(),
        }
    }
}

impl Mesh {
    /// One packet: into A's TUN side, out of B's, with both buffers given back as the agent's
    /// data plane does.
    pub fn round(&mut self) -> usize {
        self.a.handle_tun_packet(black_box(&self.pkt), self.now);
        let t = self.a.poll_transmit().unwrap();
        self.b
            .handle_datagram(Source::main(self.ea), &t.contents, self.now);
        self.a.recycle(t.contents);
        let p = self.b.poll_tun_packet().unwrap();
        let n = black_box(p.len());
        self.b.recycle(p);
        n
    }
}

/// Packets in one burst of [`Burst`]: about one TUN read's worth (a 64 KB super-packet at
/// MTU 1420 splits into 46).
pub const BURST: usize = 46;

/// The sending side of a mesh pair under a burst: [`BURST`] packets into A's TUN side, out of
/// the node as one GSO batch, not received. With `defer`, the node leaves the encryption to
/// the driver ([`Node::set_deferred_sealing`]): what the loop pays then, and what the sealing
/// thread pays ([`Unsealed::seal`]), are measured apart.
pub struct Burst {
    a: Node,
    pkt: Vec<u8>,
    now: Instant,
}

impl Burst {
    pub fn new(defer: bool) -> Burst {
        let (mut a, _, _, _) = node_pair();
        a.set_deferred_sealing(defer);
        Burst {
            a,
            pkt: packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)),
            now: Instant::now(),
        }
    }

    /// The loop's part: the burst in, the batch out as the node gives it (sealed, or left to
    /// seal); `seal`: also seal a batch left unsealed, here.
    pub fn round(&mut self, seal: bool) -> usize {
        let mut unsealed = None;
        let n = self.take(&mut unsealed);
        if let Some(u) = unsealed {
            let contents = if seal {
                u.seal().contents
            } else {
                u.into_buffer()
            };
            self.a.recycle(contents);
        }
        n
    }

    /// A burst left unsealed (for timing [`Unsealed::seal`] alone).
    pub fn unsealed(&mut self) -> Unsealed {
        let mut unsealed = None;
        self.take(&mut unsealed);
        unsealed.expect("a burst is left unsealed")
    }

    fn take(&mut self, unsealed: &mut Option<Unsealed>) -> usize {
        for _ in 0..BURST {
            self.a.handle_tun_packet(black_box(&self.pkt), self.now);
        }
        let mut n = 0;
        while let Some(out) = self.a.poll_output() {
            match out {
                Output::Transmit(t) => {
                    n += t.datagrams();
                    self.a.recycle(t.contents);
                }
                Output::Unsealed(u) => {
                    n += u.datagrams();
                    *unsealed = Some(u);
                }
                Output::Tun(p) => self.a.recycle(p),
                // (A only sends.)
                Output::Unopened(u) => self.a.handle_opened(u.open()),
                Output::Event(_) => {}
            }
        }
        assert_eq!(n, BURST, "the whole burst goes out");
        n
    }
}

/// The receiving side of a mesh pair under a burst: [`BURST`] datagrams A sealed (made fresh
/// for every round: the replay window takes each counter once) into B, out of B as packets
/// for the TUN device. With `defer`, B leaves the decryption to the driver
/// ([`Node::set_deferred_opening`]): [`Unopened::open`] is what the opening thread pays, the
/// rest the loop's share.
pub struct Receive {
    a: Node,
    b: Node,
    ea: SocketAddr,
    pkt: Vec<u8>,
    now: Instant,
}

impl Receive {
    pub fn new(defer: bool) -> Receive {
        let (a, mut b, ea, _) = node_pair();
        b.set_deferred_opening(defer);
        Receive {
            a,
            b,
            ea,
            pkt: packet(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)),
            now: Instant::now(),
        }
    }

    /// A burst sealed by A (in GSO batches of at most 64 KB), as B's socket would hand it
    /// over.
    pub fn sealed(&mut self) -> Vec<Transmit> {
        for _ in 0..BURST {
            self.a.handle_tun_packet(&self.pkt, self.now);
        }
        let batches: Vec<Transmit> = std::iter::from_fn(|| self.a.poll_transmit()).collect();
        assert_eq!(
            batches.iter().map(Transmit::datagrams).sum::<usize>(),
            BURST
        );
        batches
    }

    fn receive(&mut self, batches: Vec<Transmit>) {
        for t in batches {
            for d in t.segments() {
                self.b.handle_datagram(Source::main(self.ea), d, self.now);
            }
            self.a.recycle(t.contents);
        }
    }

    /// The whole receive: every datagram in, every packet out (opened in the loop, or handed
    /// out, opened and given back, all here).
    pub fn round(&mut self, batches: Vec<Transmit>) -> usize {
        self.receive(batches);
        let mut n = 0;
        while let Some(out) = self.b.poll_output() {
            match out {
                Output::Unopened(u) => self.b.handle_opened(u.open()),
                Output::Tun(p) => {
                    n += 1;
                    self.b.recycle(black_box(p));
                }
                Output::Transmit(t) => self.b.recycle(t.contents),
                Output::Unsealed(u) => self.b.recycle(u.into_buffer()),
                Output::Event(_) => {}
            }
        }
        assert_eq!(n, BURST, "the whole burst arrives");
        n
    }

    /// A burst set aside by B, to open (for timing [`Unopened::open`] alone).
    pub fn unopened(&mut self, batches: Vec<Transmit>) -> Unopened {
        self.receive(batches);
        match self.b.poll_output() {
            Some(Output::Unopened(u)) => u,
            other => panic!("a burst is handed out to open: {other:?}"),
        }
    }
}
