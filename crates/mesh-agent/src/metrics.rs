//! Prometheus endpoint (opt-in, `--metrics-listen`): per-peer path, RTT, bytes and handshake
//! age, the controller connection and the node's drop counters. Each scrape takes a fresh
//! snapshot from the data plane.

use crate::control::ControlStatus;
use crate::dataplane::{DataCmd, DataStatus};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Where a scrape gets its numbers.
#[derive(Clone)]
pub struct Source {
    /// The data plane.
    pub data: mpsc::Sender<DataCmd>,
    /// The control loop's status.
    pub control: Arc<Mutex<ControlStatus>>,
}

/// Renders the metrics text for one snapshot.
pub fn render(status: &DataStatus, control_connected: bool) -> String {
    let mut reg = Registry::with_prefix("mesh");
    let up = Gauge::<i64>::default();
    up.set(1);
    reg.register("node_up", "1 while the agent runs", up);
    let connected = Gauge::<i64>::default();
    connected.set(i64::from(control_connected));
    reg.register(
        "controller_connected",
        "1 while the control connection is up",
        connected,
    );
    let rx = Family::<PeerLabels, Counter>::default();
    let tx = Family::<PeerLabels, Counter>::default();
    let hs = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let rtt = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let direct = Family::<PeerLabels, Gauge>::default();
    let pmtu = Family::<PeerLabels, Gauge>::default();
    for p in &status.peers {
        let l = PeerLabels {
            peer: p.name.clone(),
            address: p.address.to_string(),
        };
        rx.get_or_create(&l).inc_by(p.rx_bytes);
        tx.get_or_create(&l).inc_by(p.tx_bytes);
        if let Some(d) = p.since_handshake {
            hs.get_or_create(&l).set(d.as_secs_f64());
        }
        if let Some(d) = p.rtt {
            rtt.get_or_create(&l).set(d.as_secs_f64());
        }
        direct
            .get_or_create(&l)
            .set(i64::from(matches!(p.path, mesh_core::Path::Direct(_))));
        if let Some(m) = p.path_mtu {
            pmtu.get_or_create(&l).set(i64::from(m));
        }
    }
    reg.register("peer_rx_bytes", "Inner bytes received from the peer", rx);
    reg.register("peer_tx_bytes", "Inner bytes sent to the peer", tx);
    reg.register(
        "peer_last_handshake_seconds",
        "Seconds since the last WireGuard handshake with the peer",
        hs,
    );
    reg.register(
        "peer_rtt_seconds",
        "Round-trip time measured by the last handshake",
        rtt,
    );
    reg.register(
        "peer_path_direct",
        "1 when the peer is reached directly, 0 when not (yet) or through a relay",
        direct,
    );
    reg.register(
        "peer_path_mtu_bytes",
        "Largest inner packet the path to the peer carries (probed)",
        pmtu,
    );
    let drops = Family::<ReasonLabels, Counter>::default();
    let c = status.node;
    for (reason, n) in [
        ("malformed", c.malformed_packets),
        ("unknown_peer", c.unknown_peer_packets),
        ("rejected", c.rejected_packets),
        ("spoofed", c.spoofed_packets),
        ("no_route", c.no_route_packets),
        ("non_ipv4", c.non_ipv4_packets),
        ("queue_full", c.queue_drops),
        ("too_big", c.too_big_packets),
        ("bad_mac1", c.bad_mac1_packets),
        ("handshake_over_budget", c.over_budget_handshakes),
        ("misdirected", c.misdirected_packets),
        ("overlay_source", c.overlay_sources),
        ("refused_candidate", c.refused_candidates),
        ("probe_budget", c.probe_budget_drops),
        ("unknown_socket", c.unknown_socket_packets),
    ] {
        drops
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }
    reg.register("dropped_packets", "Packets dropped, by reason", drops);
    let cookies = Counter::<u64>::default();
    cookies.inc_by(c.cookie_replies_sent);
    reg.register(
        "cookie_replies_sent",
        "WireGuard cookie replies sent to handshakes that came while under load",
        cookies,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

async fn scrape(
    axum::extract::State(src): axum::extract::State<Source>,
) -> (
    axum::http::StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    let ctype = [(
        axum::http::header::CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    let (tx, rx) = oneshot::channel();
    if src.data.send(DataCmd::Status(tx)).await.is_err() {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ctype,
            "data plane stopped\n".into(),
        );
    }
    let Ok(status) = rx.await else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ctype,
            "data plane stopped\n".into(),
        );
    };
    let connected = src.control.lock().map(|c| c.connected).unwrap_or(false);
    (
        axum::http::StatusCode::OK,
        ctype,
        render(&status, connected),
    )
}

/// Serves `/metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, src: Source) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(src);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::PeerStatus;
    use mesh_proto::PublicKey;
    use std::time::Duration;

    #[test]
    fn renders_peer_and_drop_metrics() {
        let status = DataStatus {
            peers: vec![PeerStatus {
                key: PublicKey([1; 32]),
                name: "node-b".into(),
                address: "100.64.0.2".parse().unwrap(),
                endpoint: Some("192.0.2.12:51820".parse().unwrap()),
                candidates: vec![],
                since_handshake: Some(Duration::from_secs(7)),
                rx_bytes: 1234,
                tx_bytes: 99,
                since_last_rx: Some(Duration::from_secs(1)),
                rtt: Some(Duration::from_millis(12)),
                path_mtu: Some(1340),
                path: mesh_core::Path::Direct("192.0.2.12:51820".parse().unwrap()),
            }],
            node: mesh_core::Counters {
                malformed_packets: 3,
                bad_mac1_packets: 4,
                cookie_replies_sent: 5,
                ..Default::default()
            },
            driver: Default::default(),
            relay_of: Default::default(),
        };
        let text = render(&status, true);
        for needle in [
            "mesh_peer_rx_bytes_total{peer=\"node-b\",address=\"100.64.0.2\"} 1234",
            "mesh_peer_tx_bytes_total{peer=\"node-b\",address=\"100.64.0.2\"} 99",
            "mesh_peer_last_handshake_seconds{peer=\"node-b\",address=\"100.64.0.2\"} 7",
            "mesh_peer_rtt_seconds{peer=\"node-b\",address=\"100.64.0.2\"} 0.012",
            "mesh_peer_path_direct{peer=\"node-b\",address=\"100.64.0.2\"} 1",
            "mesh_controller_connected 1",
            "mesh_node_up 1",
            "mesh_dropped_packets_total{reason=\"malformed\"} 3",
            "mesh_dropped_packets_total{reason=\"bad_mac1\"} 4",
            "mesh_cookie_replies_sent_total 5",
            "mesh_peer_path_mtu_bytes{peer=\"node-b\",address=\"100.64.0.2\"} 1340",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
