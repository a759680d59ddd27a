//! Prometheus endpoints (opt-in, `--metrics-listen`): the controller's node counts per network
//! and how many are online, and what a relay (the controller's own, or a standalone one)
//! forwards.

use crate::db::Db;
use crate::server::Stats;
use crate::state::unix_now;
use crate::store::Store;
use mesh_control::quic::Gate;
use mesh_relay::Forwarder;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabels {
    network: String,
}

/// Renders the metrics from the store at wall time `now`.
pub fn render(store: &Store, now: u64) -> Result<String, crate::store::StoreError> {
    let mut reg = Registry::with_prefix("mesh_controller");
    let nodes = Family::<NetworkLabels, Gauge>::default();
    let online = Family::<NetworkLabels, Gauge>::default();
    for net in store.networks()? {
        let l = NetworkLabels {
            network: net.name.clone(),
        };
        let rows = store.nodes(&net.name, now)?;
        nodes.get_or_create(&l).set(rows.len() as i64);
        online
            .get_or_create(&l)
            .set(rows.iter().filter(|r| r.online).count() as i64);
    }
    reg.register("nodes", "Nodes that are members of the network", nodes);
    reg.register(
        "nodes_online",
        "Members connected and heard from in the last 30 s",
        online,
    );
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    Ok(out)
}

/// Renders a relay's metrics.
pub fn render_relay(relay: &Forwarder) -> String {
    let mut reg = Registry::with_prefix("mesh_relay");
    let c = relay.counters();
    let connected = Gauge::<i64>::default();
    connected.set(relay.connected() as i64);
    reg.register(
        "nodes_connected",
        "Nodes connected to this relay",
        connected,
    );
    let counter = |v: u64| {
        let m = Counter::<u64>::default();
        m.inc_by(v);
        m
    };
    reg.register(
        "forwarded_frames",
        "Relay frames forwarded to a node of the sender's network",
        counter(c.forwarded),
    );
    reg.register(
        "forwarded_bytes",
        "Bytes of relay frames forwarded",
        counter(c.forwarded_bytes),
    );
    reg.register(
        "dropped_frames",
        "Relay frames dropped: malformed, destination offline or in another network, or its queue full",
        counter(c.dropped),
    );
    reg.register(
        "replaced_connections",
        "Connections closed because the same node connected again",
        counter(c.replaced),
    );
    reg.register(
        "revoked_connections",
        "Connections closed because the node was removed from its network",
        counter(c.revoked),
    );
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

/// Renders the control plane's counters: connections, heartbeats, refused candidates.
pub fn render_control(stats: &Stats, gate: &Gate) -> String {
    let mut reg = Registry::with_prefix("mesh_controller");
    let g = gate.counters();
    let gauge = |v: usize| {
        let m = Gauge::<i64>::default();
        m.set(v as i64);
        m
    };
    let counter = |v: u64| {
        let m = Counter::<u64>::default();
        m.inc_by(v);
        m
    };
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    reg.register(
        "connections",
        "QUIC connections open, handshakes included",
        gauge(g.connections),
    );
    reg.register(
        "handshakes",
        "Connections not yet admitted",
        gauge(g.handshakes),
    );
    reg.register(
        "refused_connections",
        "Connection attempts refused at the connection limit",
        counter(g.refused),
    );
    reg.register(
        "retried_connections",
        "Connection attempts asked to validate their address (QUIC Retry)",
        counter(g.retried),
    );
    reg.register(
        "heartbeats",
        "Heartbeats accepted",
        counter(load(&stats.heartbeats)),
    );
    reg.register(
        "heartbeats_dropped",
        "Heartbeats over the per-node rate limit, dropped",
        counter(load(&stats.heartbeats_dropped)),
    );
    reg.register(
        "heartbeat_writes",
        "Database writes for heartbeats",
        counter(load(&stats.heartbeat_writes)),
    );
    reg.register(
        "candidates_refused",
        "Reported endpoints refused (overlay, loopback, unspecified, multicast, broadcast, port 0)",
        counter(load(&stats.candidates_refused)),
    );
    reg.register(
        "replaced_connections",
        "Connections closed because the same node key connected again",
        counter(load(&stats.replaced)),
    );
    reg.register(
        "deltas_pushed",
        "Peer-list deltas pushed to nodes",
        counter(load(&stats.deltas_pushed)),
    );
    reg.register(
        "join_requests",
        "Join requests by network id received (each connection that asks)",
        counter(load(&stats.join_requests)),
    );
    reg.register(
        "join_requests_limited",
        "Join requests refused at once because their source address asked too often",
        counter(load(&stats.join_requests_limited)),
    );
    reg.register(
        "join_requests_dropped",
        "Pending join requests dropped to keep the per-network and per-address caps (oldest first)",
        counter(load(&stats.join_requests_dropped)),
    );
    reg.register(
        "join_requests_waiting",
        "Nodes connected now that wait for the administrator's approval",
        gauge(stats.waiting.load(std::sync::atomic::Ordering::Relaxed) as usize),
    );
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

#[derive(Clone)]
struct ScrapeState {
    store: Option<Db>,
    relay: Arc<Forwarder>,
    control: Option<(Arc<Stats>, Arc<Gate>)>,
}

async fn scrape(
    axum::extract::State(ScrapeState {
        store,
        relay,
        control,
    }): axum::extract::State<ScrapeState>,
) -> (axum::http::StatusCode, String) {
    let text = match store {
        // (A scrape reads every node of every network: on the database's thread.)
        Some(db) => db.run(|store| render(store, unix_now())).await,
        None => Ok(String::new()),
    };
    match text {
        Ok(mut t) => {
            // Each render ends with "# EOF"; one exposition has one.
            if let Some(cut) = t.rfind("# EOF") {
                t.truncate(cut);
            }
            if let Some((stats, gate)) = &control {
                let mut c = render_control(stats, gate);
                if let Some(cut) = c.rfind("# EOF") {
                    c.truncate(cut);
                }
                t.push_str(&c);
            }
            t.push_str(&render_relay(&relay));
            (axum::http::StatusCode::OK, t)
        }
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
        ),
    }
}

/// Serves `/metrics` on `addr`: the controller's (with `store`) and the relay's.
pub async fn serve(
    addr: SocketAddr,
    store: Option<Store>,
    relay: Arc<Forwarder>,
) -> anyhow::Result<()> {
    serve_with(addr, store, relay, None).await
}

/// [`serve`], plus the control plane's counters.
pub async fn serve_with(
    addr: SocketAddr,
    store: Option<Store>,
    relay: Arc<Forwarder>,
    control: Option<(Arc<Stats>, Arc<Gate>)>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let store = match store {
        Some(s) => Some(Db::start(s, "mesh-db-metrics")?),
        None => None,
    };
    let state = ScrapeState {
        store,
        relay,
        control,
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_members_and_online_nodes() {
        let dir = std::env::temp_dir().join(format!("mesh-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::open(&dir.join("c.db")).unwrap();
        let t0 = 1_800_000_000;
        s.create_network("prod", "100.64.0.0/16".parse().unwrap(), t0)
            .unwrap();
        s.create_token(
            "prod",
            &crate::store::NewToken::for_test("t", b"s", true),
            t0,
        )
        .unwrap();
        let a = s
            .join(
                "t",
                b"s",
                &mesh_proto::PublicKey([1; 32]),
                crate::store::NameRequest::Preferred("a"),
                crate::store::Candidates::default(),
                t0,
            )
            .unwrap();
        s.join(
            "t",
            b"s",
            &mesh_proto::PublicKey([2; 32]),
            crate::store::NameRequest::Preferred("b"),
            crate::store::Candidates::default(),
            t0,
        )
        .unwrap();
        s.disconnected(a.network_id, &mesh_proto::PublicKey([1; 32]), "r/1", t0)
            .unwrap();
        let text = render(&s, t0).unwrap();
        assert!(
            text.contains("mesh_controller_nodes{network=\"prod\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mesh_controller_nodes_online{network=\"prod\"} 1"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
