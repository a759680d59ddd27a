//! Prometheus endpoint (opt-in, `--metrics-listen`): per-peer path, RTT, bytes and handshake
//! age, the loss and RTT measured on each of a peer's paths, the controller connection, the router's port mapping, and every node and driver counter
//! as its declaration says (see [`mesh_core::counters`]). Each scrape takes a fresh snapshot
//! from the data plane.

use crate::control::ControlStatus;
use crate::dataplane::{DataCmd, DataStatus};
use crate::portmap::{PortMapShared, Snapshot, State};
use mesh_core::counters::Metric;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    peer: String,
    address: String,
    /// `direct` or `relay`.
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: String,
}

/// Where a scrape gets its numbers.
#[derive(Clone)]
pub struct Source {
    /// The data plane.
    pub data: mpsc::Sender<DataCmd>,
    /// The control loop's status.
    pub control: Arc<Mutex<ControlStatus>>,
    /// The router's port mapping.
    pub port_mapping: PortMapShared,
}

/// The router's port mapping: whether one is held (labelled with its protocol, `none`
/// otherwise), how long its lease still runs, and how renewals went.
fn register_port_mapping(reg: &mut Registry, pm: &Snapshot) {
    let active = Family::<ProtocolLabels, Gauge>::default();
    active
        .get_or_create(&ProtocolLabels {
            protocol: pm.protocol.map_or("none", |p| p.name()).to_owned(),
        })
        .set(i64::from(pm.state == State::Mapped));
    reg.register(
        "port_mapping_active",
        "1 while the router forwards the UDP port (UPnP IGD, NAT-PMP or PCP), labelled with the protocol",
        active,
    );
    if let Some((at, _)) = pm.expires {
        let left = Gauge::<f64, AtomicU64>::default();
        left.set(at.saturating_duration_since(Instant::now()).as_secs_f64());
        reg.register(
            "port_mapping_lease_remaining_seconds",
            "Seconds until the router's port mapping lease runs out unless renewed",
            left,
        );
    }
    let renewals = Counter::<u64>::default();
    renewals.inc_by(pm.renewals);
    reg.register(
        "port_mapping_renewals",
        "Port mapping leases renewed",
        renewals,
    );
    let failures = Counter::<u64>::default();
    failures.inc_by(pm.failures);
    reg.register(
        "port_mapping_failures",
        "Port mapping requests and renewals that got no usable mapping",
        failures,
    );
}

/// What the metrics show of the control connection.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Whether it is up.
    pub connected: bool,
    /// `quic` or `tcp`.
    pub transport: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: String,
}

/// Renders the metrics text for one snapshot.
pub fn render(status: &DataStatus, control: &Control, port_mapping: &Snapshot) -> String {
    let control_connected = control.connected;
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
    let transport = Family::<TransportLabels, Gauge>::default();
    for t in ["quic", "tcp"] {
        let on = control.connected && control.transport.as_deref() == Some(t);
        transport
            .get_or_create(&TransportLabels {
                transport: t.to_owned(),
            })
            .set(i64::from(on));
    }
    reg.register(
        "controller_transport",
        "1 for the transport the control connection uses (tcp where UDP does not get through)",
        transport,
    );
    let rx = Family::<PeerLabels, Counter>::default();
    let tx = Family::<PeerLabels, Counter>::default();
    let hs = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let rtt = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    let direct = Family::<PeerLabels, Gauge>::default();
    let direct6 = Family::<PeerLabels, Gauge>::default();
    let pmtu = Family::<PeerLabels, Gauge>::default();
    let path_loss = Family::<PathLabels, Gauge<f64, AtomicU64>>::default();
    let path_rtt = Family::<PathLabels, Gauge<f64, AtomicU64>>::default();
    for p in &status.peers {
        for (path, q) in [("direct", p.direct_quality), ("relay", p.relay_quality)] {
            let l = PathLabels {
                peer: p.name.clone(),
                address: p.address.to_string(),
                path: path.to_owned(),
            };
            if let Some(loss) = q.loss {
                path_loss.get_or_create(&l).set(loss);
            }
            if let Some(rtt) = q.rtt {
                path_rtt.get_or_create(&l).set(rtt.as_secs_f64());
            }
        }
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
        direct6.get_or_create(&l).set(i64::from(
            matches!(p.path, mesh_core::Path::Direct(e) if e.is_ipv6()),
        ));
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
        "peer_path_direct_ipv6",
        "1 when the peer is reached directly over IPv6, 0 otherwise",
        direct6,
    );
    reg.register(
        "peer_path_mtu_bytes",
        "Largest inner packet the path to the peer carries (probed)",
        pmtu,
    );
    reg.register(
        "peer_path_loss_ratio",
        "Fraction of packets to the peer lost on the path (direct or relay) over the last quality window, where measured",
        path_loss,
    );
    reg.register(
        "peer_path_rtt_seconds",
        "Mean round-trip time of the probes on the path (direct or relay) over the last quality window, where measured",
        path_rtt,
    );
    // The node's and the driver's counters, each shown as its declaration says.
    let drops = Family::<ReasonLabels, Counter>::default();
    let node = status.node.entries();
    let driver = status.driver.entries();
    let birthday = status.birthday.entries();
    for e in node.iter().chain(driver.iter()).chain(birthday.iter()) {
        // The registry appends the full stop.
        let help = e.help.strip_suffix('.').unwrap_or(e.help);
        match e.metric {
            Metric::Drop(reason) => {
                drops
                    .get_or_create(&ReasonLabels {
                        reason: reason.to_owned(),
                    })
                    .inc_by(e.value);
            }
            Metric::Counter(name) => {
                let counter = Counter::<u64>::default();
                counter.inc_by(e.value);
                reg.register(name, help, counter);
            }
            Metric::Gauge(name) => {
                let gauge = Gauge::<u64, AtomicU64>::default();
                gauge.set(e.value);
                reg.register(name, help, gauge);
            }
        }
    }
    reg.register("dropped_packets", "Packets dropped, by reason", drops);
    register_port_mapping(&mut reg, port_mapping);
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
    let control = src
        .control
        .lock()
        .map(|c| Control {
            connected: c.connected,
            transport: c.transport.clone(),
        })
        .unwrap_or_default();
    (
        axum::http::StatusCode::OK,
        ctype,
        render(&status, &control, &src.port_mapping.snapshot()),
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
    use crate::dataplane::DriverCounters;
    use mesh_core::PeerStatus;
    use mesh_proto::PublicKey;
    use std::collections::BTreeSet;
    use std::time::Duration;

    #[test]
    fn renders_peer_and_drop_metrics() {
        let status = DataStatus {
            peers: vec![PeerStatus {
                key: PublicKey([1; 32]),
                name: "node-b".into(),
                address: "100.64.0.2".parse().unwrap(),
                address6: None,
                endpoint: Some("192.0.2.12:51820".parse().unwrap()),
                candidates: vec![],
                since_handshake: Some(Duration::from_secs(7)),
                rx_bytes: 1234,
                tx_bytes: 99,
                since_last_rx: Some(Duration::from_secs(1)),
                rtt: Some(Duration::from_millis(12)),
                path_mtu: Some(1340),
                path: mesh_core::Path::Direct("192.0.2.12:51820".parse().unwrap()),
                direct_quality: mesh_core::PathQuality {
                    loss: Some(0.25),
                    rtt: Some(Duration::from_millis(12)),
                },
                relay_quality: mesh_core::PathQuality {
                    loss: None,
                    rtt: Some(Duration::from_millis(40)),
                },
                on_demand: false,
            }],
            node: mesh_core::Counters {
                malformed_packets: 3,
                bad_mac1_packets: 4,
                cookie_replies_sent: 5,
                unknown_socket_packets: 6,
                ..Default::default()
            },
            driver: DriverCounters {
                udp_rx: 8,
                relay_reassembly_drops: 9,
                extra_sockets: 2,
                ..Default::default()
            },
            birthday: mesh_core::BirthdayStats {
                birthday_probes_sent: 11,
                ..Default::default()
            },
            relay_of: Default::default(),
        };
        let pm = Snapshot {
            state: State::Mapped,
            protocol: Some(crate::portmap::Protocol::Pcp),
            expires: Some((
                Instant::now() + Duration::from_secs(3600),
                std::time::SystemTime::now(),
            )),
            renewals: 3,
            ..Snapshot::default()
        };
        let control = Control {
            connected: true,
            transport: Some("tcp".into()),
        };
        let text = render(&status, &control, &pm);
        for needle in [
            "mesh_port_mapping_active{protocol=\"pcp\"} 1",
            "mesh_port_mapping_renewals_total 3",
            "mesh_port_mapping_failures_total 0",
            "# TYPE mesh_port_mapping_lease_remaining_seconds gauge",
            "mesh_peer_rx_bytes_total{peer=\"node-b\",address=\"100.64.0.2\"} 1234",
            "mesh_peer_tx_bytes_total{peer=\"node-b\",address=\"100.64.0.2\"} 99",
            "mesh_peer_last_handshake_seconds{peer=\"node-b\",address=\"100.64.0.2\"} 7",
            "mesh_peer_rtt_seconds{peer=\"node-b\",address=\"100.64.0.2\"} 0.012",
            "mesh_peer_path_direct{peer=\"node-b\",address=\"100.64.0.2\"} 1",
            "mesh_controller_connected 1",
            "mesh_controller_transport{transport=\"tcp\"} 1",
            "mesh_controller_transport{transport=\"quic\"} 0",
            "mesh_node_up 1",
            "mesh_dropped_packets_total{reason=\"malformed\"} 3",
            "mesh_dropped_packets_total{reason=\"bad_mac1\"} 4",
            "mesh_cookie_replies_sent_total 5",
            "mesh_dropped_packets_total{reason=\"unknown_socket\"} 6",
            "# HELP mesh_cookie_replies_sent WireGuard cookie replies sent to direct handshakes that came while under load.",
            "mesh_udp_rx_datagrams_total 8",
            "# HELP mesh_udp_rx_datagrams Datagrams received on the UDP socket.",
            "mesh_dropped_packets_total{reason=\"relay_reassembly\"} 9",
            "# TYPE mesh_extra_sockets_open gauge",
            "mesh_extra_sockets_open 2",
            "mesh_birthday_probes_sent_total 11",
            "mesh_peer_path_mtu_bytes{peer=\"node-b\",address=\"100.64.0.2\"} 1340",
            "mesh_peer_path_loss_ratio{peer=\"node-b\",address=\"100.64.0.2\",path=\"direct\"} 0.25",
            "mesh_peer_path_rtt_seconds{peer=\"node-b\",address=\"100.64.0.2\",path=\"direct\"} 0.012",
            "mesh_peer_path_rtt_seconds{peer=\"node-b\",address=\"100.64.0.2\",path=\"relay\"} 0.04",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            !text.contains(
                "mesh_peer_path_loss_ratio{peer=\"node-b\",address=\"100.64.0.2\",path=\"relay\"}"
            ),
            "no relay loss where none was measured"
        );
    }

    /// Both outputs are built from the counter declarations: a counter added later shows in
    /// `mesh status --json` under its field name and in Prometheus under its own series.
    #[test]
    fn every_counter_shows_in_status_json_and_metrics() {
        let status = DataStatus {
            peers: vec![],
            node: Default::default(),
            driver: Default::default(),
            birthday: Default::default(),
            relay_of: Default::default(),
        };
        let json = crate::daemon::counters_json(&status.node, &status.driver, &status.birthday);
        let control = Control {
            connected: true,
            transport: Some("quic".into()),
        };
        let text = render(&status, &control, &Snapshot::default());
        assert!(
            text.contains("mesh_port_mapping_active{protocol=\"none\"} 0"),
            "{text}"
        );
        let node = status.node.entries();
        let driver = status.driver.entries();
        let birthday = status.birthday.entries();
        let mut series = BTreeSet::new();
        for e in node.iter().chain(driver.iter()).chain(birthday.iter()) {
            assert_eq!(
                json[e.name].as_u64(),
                Some(0),
                "{} missing in {json:#}",
                e.name
            );
            let line = match e.metric {
                Metric::Drop(reason) => {
                    format!("mesh_dropped_packets_total{{reason=\"{reason}\"}} 0")
                }
                Metric::Counter(name) => format!("mesh_{name}_total 0"),
                Metric::Gauge(name) => format!("mesh_{name} 0"),
            };
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
            assert!(series.insert(line.clone()), "two counters share {line}");
        }
        assert_eq!(
            json.as_object().map(|o| o.len()),
            Some(node.len() + driver.len() + birthday.len()),
            "two counters share a key in {json:#}"
        );
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let distinct: BTreeSet<&str> = types
            .iter()
            .map(|l| l.split(' ').nth(2).unwrap_or(""))
            .collect();
        assert_eq!(
            distinct.len(),
            types.len(),
            "a metric is registered twice in\n{text}"
        );
    }
}
