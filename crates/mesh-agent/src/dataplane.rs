//! The data-plane driver: one task that owns the [`mesh_core::Node`] and does its I/O.
//!
//! It reads the shared UDP socket in batches (recvmmsg/GRO), hands QUIC datagrams to the quinn
//! endpoint and everything else to the node, reads the TUN device (draining up to a batch per
//! wake-up), runs the node's timers, and writes what the node produced: datagrams grouped into
//! GSO batches per destination, and packets to the TUN device.

use mesh_core::{Node, PeerConfig, PeerStatus, Transmit};
use mesh_proto::control::PeerInfo;
use mesh_proto::demux::{classify, DatagramKind};
use mesh_sys::socket::{Batch, QuicInbox, UdpPort};
use mesh_sys::tun::Tun;
use quinn::udp::RecvMeta;
use std::io::IoSliceMut;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

/// Datagrams per receive call.
const RECV_BATCH: usize = 32;
/// Bytes per receive buffer (room for a GRO batch).
const RECV_BUF: usize = 65536;
/// TUN packets handled per wake-up before the node's output is flushed.
const TUN_BATCH: usize = 64;

/// Requests to the data plane.
pub enum DataCmd {
    /// Replace the peer list.
    SetPeers(Vec<PeerInfo>),
    /// The node's overlay address (known after the join).
    SetAddress(std::net::Ipv4Addr),
    /// Report status.
    Status(oneshot::Sender<DataStatus>),
}

/// Counters kept by the driver itself (the node keeps its own).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DriverCounters {
    /// Datagrams received on the UDP socket.
    pub udp_rx: u64,
    /// Datagrams sent.
    pub udp_tx: u64,
    /// Send calls that failed.
    pub udp_send_errors: u64,
    /// Datagrams whose first bytes match no protocol.
    pub unknown_datagrams: u64,
    /// QUIC datagrams dropped because the QUIC endpoint was behind.
    pub quic_drops: u64,
    /// Packets written to TUN.
    pub tun_tx: u64,
    /// Packets read from TUN.
    pub tun_rx: u64,
    /// Failed TUN writes.
    pub tun_write_errors: u64,
}

/// A status snapshot.
#[derive(Debug, Clone)]
pub struct DataStatus {
    /// Every peer.
    pub peers: Vec<PeerStatus>,
    /// Node drop counters.
    pub node: mesh_core::Counters,
    /// Driver counters.
    pub driver: DriverCounters,
}

fn to_config(p: &PeerInfo) -> PeerConfig {
    PeerConfig {
        key: p.key,
        name: p.name.clone(),
        address: p.address,
        endpoints: p.endpoints.clone(),
    }
}

/// Path changes the daemon acts on outside the data plane (route configuration).
#[derive(Debug, Clone)]
pub enum PathEvent {
    /// A peer's path carries at most `mtu` bytes (inner); `configured` is the interface MTU.
    Mtu {
        /// The peer's overlay address.
        peer: std::net::Ipv4Addr,
        /// Path MTU.
        mtu: u16,
        /// Interface MTU.
        configured: u16,
    },
}

/// Runs the data plane until `shutdown` flips.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut node: Node,
    port: UdpPort,
    tun: std::sync::Arc<Tun>,
    quic: QuicInbox,
    mut cmds: mpsc::Receiver<DataCmd>,
    events: mpsc::UnboundedSender<PathEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut counters = DriverCounters::default();
    let mut recv_bufs = vec![vec![0u8; RECV_BUF]; RECV_BATCH];
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let mut tun_buf = vec![0u8; 65536];
    let mut out: Vec<Transmit> = Vec::new();
    let mut gso_buf: Vec<u8> = Vec::with_capacity(65536);
    let far = Duration::from_secs(3600);
    loop {
        let deadline = node.poll_timeout().unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            r = async {
                let mut slices: Vec<IoSliceMut<'_>> =
                    recv_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                port.recv(&mut slices, &mut meta).await
            } => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let now = Instant::now();
                for (buf, m) in recv_bufs.iter().zip(meta.iter()).take(n) {
                    let stride = m.stride.max(1);
                    for datagram in buf[..m.len].chunks(stride) {
                        counters.udp_rx += 1;
                        match classify(datagram) {
                            DatagramKind::Quic => {
                                if !quic.deliver(m.addr, datagram) {
                                    counters.quic_drops += 1;
                                }
                            }
                            DatagramKind::WireGuard => node.handle_datagram(m.addr, datagram, now),
                            DatagramKind::Stun | DatagramKind::Unknown => {
                                counters.unknown_datagrams += 1;
                                // The node counts it as malformed too; kept in one place.
                                node.handle_datagram(m.addr, datagram, now);
                            }
                        }
                    }
                }
            }
            r = tun.recv(&mut tun_buf) => {
                let now = Instant::now();
                match r {
                    Ok(len) => {
                        counters.tun_rx += 1;
                        node.handle_tun_packet(&tun_buf[..len], now);
                        // Drain what else is waiting, so sends can be batched.
                        for _ in 1..TUN_BATCH {
                            match tun.try_recv(&mut tun_buf) {
                                Ok(len) => {
                                    counters.tun_rx += 1;
                                    node.handle_tun_packet(&tun_buf[..len], now);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "TUN read failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                node.handle_timeout(Instant::now());
            }
            cmd = cmds.recv() => match cmd {
                Some(DataCmd::SetPeers(peers)) => {
                    let configs: Vec<PeerConfig> = peers.iter().map(to_config).collect();
                    node.set_peers(&configs, Instant::now());
                }
                Some(DataCmd::SetAddress(a)) => node.set_address(a),
                Some(DataCmd::Status(reply)) => {
                    let _ = reply.send(DataStatus {
                        peers: node.peer_status(Instant::now()),
                        node: node.counters(),
                        driver: counters,
                    });
                }
                None => return,
            },
            _ = shutdown.changed() => return,
        }
        while let Some(ev) = node.poll_event() {
            debug!(?ev, "node event");
            if let mesh_core::Event::PathMtu {
                address,
                mtu,
                configured,
                ..
            } = ev
            {
                let _ = events.send(PathEvent::Mtu {
                    peer: address,
                    mtu,
                    configured,
                });
            }
        }
        out.extend(std::iter::from_fn(|| node.poll_transmit()));
        if !out.is_empty() {
            send_all(&port, &mut out, &mut gso_buf, &mut counters).await;
        }
        while let Some(pkt) = node.poll_tun_packet() {
            match tun.send(&pkt).await {
                Ok(_) => counters.tun_tx += 1,
                Err(e) => {
                    counters.tun_write_errors += 1;
                    debug!(error = %e, "TUN write failed");
                }
            }
        }
    }
}

/// Sends every transmit, grouping runs to one destination into GSO batches: every datagram of
/// a batch has the first one's size except the last, which may be shorter.
async fn send_all(
    port: &UdpPort,
    out: &mut Vec<Transmit>,
    gso_buf: &mut Vec<u8>,
    counters: &mut DriverCounters,
) {
    let max = port.max_gso_segments().max(1);
    let mut i = 0;
    while i < out.len() {
        let dst = out[i].dst;
        let size = out[i].payload.len();
        let mut j = i + 1;
        while j < out.len()
            && j - i < max
            && out[j].dst == dst
            && out[j].payload.len() <= size
            && out[j - 1].payload.len() == size
            && gso_buf.capacity() >= (j - i + 1) * size
        {
            j += 1;
        }
        let result = if j - i == 1 {
            port.send(&Batch {
                dst,
                contents: &out[i].payload,
                segment_size: None,
            })
            .await
        } else {
            gso_buf.clear();
            for t in &out[i..j] {
                gso_buf.extend_from_slice(&t.payload);
            }
            port.send(&Batch {
                dst,
                contents: gso_buf,
                segment_size: Some(size),
            })
            .await
        };
        match result {
            Ok(()) => counters.udp_tx += (j - i) as u64,
            Err(e) => {
                counters.udp_send_errors += 1;
                debug!(%dst, error = %e, "UDP send failed");
            }
        }
        i = j;
    }
    out.clear();
}
