//! Counters declared once and read by every output that shows them.
//!
//! [`counters!`](crate::counters!) declares a struct of `u64` counters from one list: each field
//! with its doc comment (the help text) and how Prometheus shows it ([`Metric`]). The struct's
//! `entries()` hands out every counter in declaration order, so `mesh status` and the
//! Prometheus endpoint need not name any field. [`Counters`] are the node's.

#[cfg(doc)]
use crate::node::PROBE_BUDGET;

/// How a counter shows in Prometheus. Names leave out the `mesh_` prefix, and the `_total` suffix
/// that a counter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Packets dropped for one reason: the series `mesh_dropped_packets_total{reason="..."}`.
    Drop(&'static str),
    /// A counter of its own: `mesh_<name>_total`.
    Counter(&'static str),
    /// How many of something there are now (goes up and down): `mesh_<name>`.
    Gauge(&'static str),
}

/// One counter of a struct declared with [`counters!`](crate::counters!), with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The field's name, which is also its key in `mesh status --json`.
    pub name: &'static str,
    /// The field's doc comment on one line.
    pub help: &'static str,
    /// How it shows in Prometheus.
    pub metric: Metric,
    /// The value.
    pub value: u64,
}

/// Declares a struct of `u64` counters, each field with a doc comment and a [`Metric`] variant
/// (`Drop`, `Counter` or `Gauge`) with its Prometheus name:
///
/// ```
/// mesh_core::counters! {
///     /// What a sender counted.
///     pub struct SendCounters {
///         /// Datagrams sent.
///         sent: Counter("sent_datagrams"),
///         /// Datagrams dropped because the queue was full.
///         queue_full: Drop("send_queue_full"),
///     }
/// }
/// let c = SendCounters { sent: 3, ..Default::default() };
/// assert_eq!(c.entries()[0].name, "sent");
/// assert_eq!(c.entries()[0].help, "Datagrams sent.");
/// assert_eq!(c.entries()[0].value, 3);
/// ```
///
/// The struct derives `Debug, Clone, Copy, Default, PartialEq, Eq`; its fields are public;
/// `entries()` returns every counter as an [`Entry`], in declaration order. Each field's
/// rustdoc gets a line naming its Prometheus series.
#[macro_export]
macro_rules! counters {
    (@series Drop $m:literal) => {
        concat!("Prometheus: `mesh_dropped_packets_total{reason=\"", $m, "\"}`.")
    };
    (@series Counter $m:literal) => {
        concat!("Prometheus: `mesh_", $m, "_total`.")
    };
    (@series Gauge $m:literal) => {
        concat!("Prometheus: gauge `mesh_", $m, "`.")
    };
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $field:ident: $kind:ident($metric:literal)
            ),+ $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        $vis struct $name {
            $(
                $(#[doc = $doc])+
                #[doc = ""]
                #[doc = $crate::counters!(@series $kind $metric)]
                pub $field: u64,
            )+
        }

        impl $name {
            /// How many counters there are.
            pub const LEN: usize = [$(stringify!($field)),+].len();

            /// Every counter with its value, in declaration order.
            pub fn entries(&self) -> [$crate::counters::Entry; Self::LEN] {
                [$(
                    $crate::counters::Entry {
                        name: stringify!($field),
                        help: concat!($($doc),+).trim_ascii(),
                        metric: $crate::counters::Metric::$kind($metric),
                        value: self.$field,
                    }
                ),+]
            }
        }
    };
}

counters! {
    /// Packets dropped, by reason. A bad packet is a counter, never an error.
    pub struct Counters {
        /// Datagrams that are not well-formed WireGuard messages for us.
        malformed_packets: Drop("malformed"),
        /// Handshakes or packets from keys or indices we do not know.
        unknown_peer_packets: Drop("unknown_peer"),
        /// WireGuard refused the datagram (bad MAC, replay, expired ...).
        rejected_packets: Drop("rejected"),
        /// Decrypted packets whose source is not the peer's overlay address (IPv4 or IPv6) nor
        /// inside a prefix it routes.
        spoofed_packets: Drop("spoofed"),
        /// TUN packets to an address no peer has.
        no_route_packets: Drop("no_route"),
        /// TUN packets mesh does not route: neither IPv4 nor IPv6, or link-scoped IPv6 (router
        /// and neighbour solicitations, multicast).
        non_ipv4_packets: Drop("non_ipv4"),
        /// Packets dropped because a queue was full.
        queue_drops: Drop("queue_full"),
        /// TUN packets larger than the peer's path MTU (answered with ICMP when DF was set).
        too_big_packets: Drop("too_big"),
        /// Datagrams on an extra socket the node has closed, or for another peer than the socket's.
        unknown_socket_packets: Drop("unknown_socket"),
        /// Decrypted packets not addressed to this node (a member trying to use it as a router).
        misdirected_packets: Drop("misdirected"),
        /// Peer endpoint candidates refused because the overlay reaches them (the overlay range,
        /// an interface stacked on the overlay, a route through it) or they are this host's own.
        refused_candidates: Drop("refused_candidate"),
        /// Datagrams whose source is reached through the overlay (WireGuard inside the overlay):
        /// dropped, never taken as a peer's endpoint.
        overlay_sources: Drop("overlay_source"),
        /// Probes not sent because their target IP had its [`PROBE_BUDGET`] for the minute.
        probe_budget_drops: Drop("probe_budget"),
        /// Handshakes without a valid mac1 for this node's key (dropped before any DH).
        bad_mac1_packets: Drop("bad_mac1"),
        /// Handshakes dropped because the node-wide DH budget was spent (see [`crate::guard`]).
        over_budget_handshakes: Drop("handshake_over_budget"),
        /// WireGuard cookie replies sent to direct handshakes that came while under load.
        cookie_replies_sent: Counter("cookie_replies_sent"),
        /// Probes sent with a low IP TTL to open the node's own NAT toward a peer before the
        /// peer fires at it (see `PRIMER_TTL`).
        primers_sent: Counter("primers_sent"),
        /// Coordinated punch rounds this node started (primed, then asked the peer to fire).
        punch_rounds: Counter("punch_rounds"),
        /// Coordinated punch rounds of a peer this node answered (primed, fired, acknowledged).
        punch_answers: Counter("punch_answers"),
        /// Times one peer's timers ran: the node's per-peer work. An idle peer costs one at each
        /// keepalive and at its session's rekey and expiry ages, nothing in between.
        peer_timer_runs: Counter("peer_timer_runs"),
        /// Loss reports from peers that were not well-formed (dropped).
        malformed_loss_reports: Drop("malformed_loss_report"),
        /// Loss reports sent to peers: what this node received of their data, per path.
        loss_reports_sent: Counter("loss_reports_sent"),
        /// Loss reports received from peers.
        loss_reports_received: Counter("loss_reports_received"),
        /// Loss reports that could not be matched with what this node sent (a session or span
        /// it no longer remembers, or nothing sent on that path): they count for nothing.
        loss_reports_unmatched: Counter("loss_reports_unmatched"),
        /// Probes sent to measure the loss and round-trip time of a path.
        quality_probes_sent: Counter("quality_probes_sent"),
        /// Times a peer's traffic moved from its direct path to the relay because the direct
        /// path lost packets.
        quality_switches_to_relay: Counter("quality_switches_to_relay"),
        /// Times a peer's traffic moved back from the relay to its recovered direct path.
        quality_switches_to_direct: Counter("quality_switches_to_direct"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    counters! {
        /// Two counters for the tests.
        struct Pair {
            /// First line,
            /// second line.
            first: Counter("first_things"),
            /// Open now.
            second: Gauge("open_things")
        }
    }

    #[test]
    fn entries_follow_the_declaration() {
        let p = Pair {
            first: 7,
            second: 9,
        };
        assert_eq!(Pair::LEN, 2);
        assert_eq!(
            p.entries(),
            [
                Entry {
                    name: "first",
                    help: "First line, second line.",
                    metric: Metric::Counter("first_things"),
                    value: 7,
                },
                Entry {
                    name: "second",
                    help: "Open now.",
                    metric: Metric::Gauge("open_things"),
                    value: 9,
                },
            ]
        );
    }

    /// The node's Prometheus names are what dashboards and alerts already use: a rename must be
    /// deliberate.
    #[test]
    fn node_counters_keep_their_published_names() {
        let shown: Vec<(&str, Metric)> = Counters::default()
            .entries()
            .iter()
            .map(|e| (e.name, e.metric))
            .collect();
        use Metric::{Counter, Drop};
        assert_eq!(
            shown,
            [
                ("malformed_packets", Drop("malformed")),
                ("unknown_peer_packets", Drop("unknown_peer")),
                ("rejected_packets", Drop("rejected")),
                ("spoofed_packets", Drop("spoofed")),
                ("no_route_packets", Drop("no_route")),
                ("non_ipv4_packets", Drop("non_ipv4")),
                ("queue_drops", Drop("queue_full")),
                ("too_big_packets", Drop("too_big")),
                ("unknown_socket_packets", Drop("unknown_socket")),
                ("misdirected_packets", Drop("misdirected")),
                ("refused_candidates", Drop("refused_candidate")),
                ("overlay_sources", Drop("overlay_source")),
                ("probe_budget_drops", Drop("probe_budget")),
                ("bad_mac1_packets", Drop("bad_mac1")),
                ("over_budget_handshakes", Drop("handshake_over_budget")),
                ("cookie_replies_sent", Counter("cookie_replies_sent")),
                ("primers_sent", Counter("primers_sent")),
                ("punch_rounds", Counter("punch_rounds")),
                ("punch_answers", Counter("punch_answers")),
                ("peer_timer_runs", Counter("peer_timer_runs")),
                ("malformed_loss_reports", Drop("malformed_loss_report")),
                ("loss_reports_sent", Counter("loss_reports_sent")),
                ("loss_reports_received", Counter("loss_reports_received")),
                ("loss_reports_unmatched", Counter("loss_reports_unmatched")),
                ("quality_probes_sent", Counter("quality_probes_sent")),
                (
                    "quality_switches_to_relay",
                    Counter("quality_switches_to_relay")
                ),
                (
                    "quality_switches_to_direct",
                    Counter("quality_switches_to_direct")
                ),
            ]
        );
    }

    #[test]
    fn node_counters_are_distinct_and_described() {
        let entries = Counters::default().entries();
        let metrics: BTreeSet<_> = entries.iter().map(|e| format!("{:?}", e.metric)).collect();
        assert_eq!(metrics.len(), entries.len(), "two counters share a series");
        for e in entries {
            assert!(!e.help.is_empty(), "{} has no help", e.name);
            let (Metric::Drop(m) | Metric::Counter(m) | Metric::Gauge(m)) = e.metric;
            assert!(
                !m.is_empty()
                    && m.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{m:?} is not a plain Prometheus name"
            );
        }
    }
}
