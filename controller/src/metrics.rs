//! Prometheus endpoints (opt-in, `--metrics-listen`): the controller's node counts per network
//! and how many are online, and what a relay (the controller's own, or a standalone one)
//! forwards.

use crate::state::unix_now;
use crate::store::Store;
use mesh_relay::Forwarder;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

type ScrapeState = (Option<Arc<Mutex<Store>>>, Arc<Forwarder>);

async fn scrape(
    axum::extract::State((store, relay)): axum::extract::State<ScrapeState>,
) -> (axum::http::StatusCode, String) {
    let text = match store {
        Some(store) => {
            let guard = store.lock().unwrap_or_else(|p| p.into_inner());
            render(&guard, unix_now())
        }
        None => Ok(String::new()),
    };
    match text {
        Ok(mut t) => {
            // Each render ends with "# EOF"; one exposition has one.
            if let Some(cut) = t.rfind("# EOF") {
                t.truncate(cut);
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
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let state: ScrapeState = (store.map(|s| Arc::new(Mutex::new(s))), relay);
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
        s.create_token("prod", "t", b"s", true, None, t0).unwrap();
        let a = s
            .join("t", b"s", &mesh_proto::PublicKey([1; 32]), "a", &[], t0)
            .unwrap();
        s.join("t", b"s", &mesh_proto::PublicKey([2; 32]), "b", &[], t0)
            .unwrap();
        s.disconnected(a.network_id, &mesh_proto::PublicKey([1; 32]), t0)
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
