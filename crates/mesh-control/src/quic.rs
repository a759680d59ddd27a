//! QUIC configuration shared by agents, the controller and standalone relays.
//!
//! The protocol needs little from QUIC: one bidirectional stream per connection (the Noise
//! channel, opened by the node), no unidirectional streams, and datagrams for relayed frames.
//! The transport limits say exactly that, so that one peer cannot make a server hold more than
//! a bounded amount of memory: see [`server_transport`] and [`Gate`] for the numbers.

use mesh_proto::control::MAX_MESSAGE_LEN;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// ALPN of the mesh control protocol.
pub const ALPN: &[u8] = b"mesh/1";
/// QUIC keepalive, sent by nodes only (a server's acks answer them): well under common NAT
/// UDP timeouts. Every node's keepalive is a wake-up of its server, the bulk of an idle
/// controller's work: 1,000 nodes send 500 a second (667 at 1.5 s, 1,000 at 1 s). How fast a
/// node notices a dead server does not hang on it alone: see [`ANSWER_WITHIN`].
pub const KEEPALIVE: Duration = Duration::from_millis(2000);
/// A node that sent a server something that asks for an answer (a keepalive, a message, a relayed
/// datagram) and has heard nothing at all since, for this long, takes the server for gone and
/// connects to another (the agent watches its links with [`crate::Link::unanswered`]). A server
/// acknowledges at once, and QUIC probes for a lost ack after a probe timeout (the round trip, four
/// times its variance and the ack delay), doubling each time: within this, three probes go out on a
/// steady 100 ms path and two on a 300 ms one. A dead server is noticed within `KEEPALIVE +
/// ANSWER_WITHIN` (and a quarter second of sampling): 4 s, leaving a second to reach another
/// replica within the 5 s promised.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1750);
/// Bytes of relayed datagrams queued per connection and direction.
pub const RELAY_BUFFER: usize = 512 * 1024;
/// A connection that hears nothing for this long is closed by QUIC itself (both sides use the
/// smaller of their values). It is what tells a server that a node is gone; nodes notice a
/// dead server sooner ([`ANSWER_WITHIN`]). Three keepalives long: a node is not dropped for a
/// lost keepalive and two lost probes, even on a slow path.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(6000);
/// Bidirectional streams a node may open toward a server at once: the Noise channel only.
pub const SERVER_MAX_BIDI_STREAMS: u32 = 1;
/// Per-stream receive window at a server. Nodes send small messages (join, hello, heartbeat,
/// ticket renewals: a few KB); two maximal Noise frames (64 KiB each) keep them flowing.
pub const SERVER_STREAM_WINDOW: u32 = 128 * 1024;
/// Bytes a server buffers for sending per connection, unacknowledged ones included. A larger
/// message is written as the node acknowledges; a node that reads slowly holds no more than
/// this of its server's memory (with the largest control message here, 5,000 nodes joining at
/// once held about 5 GB of a controller).
pub const SERVER_SEND_WINDOW: u64 = 256 * 1024;
/// Per-stream receive window at a node: the largest control message (a full peer list).
pub const CLIENT_STREAM_WINDOW: u32 = MAX_MESSAGE_LEN as u32 + 64 * 1024;
/// Connection attempts quinn queues before the server looks at them.
pub const MAX_INCOMING: usize = 1024;
/// Bytes buffered for one connection attempt before the server accepts it.
pub const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes buffered for all connection attempts together.
pub const INCOMING_BUFFER_TOTAL: u64 = 16 * 1024 * 1024;

/// Building a QUIC configuration failed.
#[derive(Debug, thiserror::Error)]
#[error("QUIC/TLS configuration: {0}")]
pub struct ConfigError(String);

pub(crate) fn err(e: impl std::fmt::Display) -> ConfigError {
    ConfigError(e.to_string())
}

/// Endpoint settings for every mesh endpoint: the QUIC fixed bit is never greased, so the first
/// byte of every QUIC packet has 0x40 set and can be told apart from WireGuard and STUN.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.grease_quic_bit(false);
    c
}

fn derive(label: &[u8], secret: &[u8; 32]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label);
    ctx.update(secret);
    ctx.finish()
}

/// Endpoint settings for the controller. The stateless-reset key and the connection-ID key are
/// derived from the controller's persistent private key. A restarted controller then recognises
/// the connection IDs of its previous life as its own, and answers them with a stateless reset
/// the node accepts, so nodes reconnect within one keepalive instead of an idle timeout.
pub fn controller_endpoint_config(controller_secret: &[u8; 32]) -> quinn::EndpointConfig {
    let reset = derive(b"mesh quic stateless reset key", controller_secret);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref());
    let mut c = quinn::EndpointConfig::new(Arc::new(key));
    let cid = derive(b"mesh quic connection id key", controller_secret);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    c.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    c.grease_quic_bit(false);
    c
}

fn base_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE));
    // Relayed WireGuard messages travel as datagrams. These buffers bound what one node can
    // have queued at the relay (and the relay at a node); when full, the oldest go first.
    t.datagram_receive_buffer_size(Some(RELAY_BUFFER));
    t.datagram_send_buffer_size(RELAY_BUFFER);
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    // Nothing in the protocol uses unidirectional streams.
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// Transport limits of a server (controller or relay), per connection: one bidirectional
/// stream, no unidirectional one, [`SERVER_STREAM_WINDOW`] of unread stream data,
/// [`SERVER_SEND_WINDOW`] of unsent data, and the datagram buffers ([`RELAY_BUFFER`] each way).
/// About 1.4 MiB at most per connection (quinn's defaults allowed 200 streams of 1.2 MB
/// each and an unbounded connection window).
pub fn server_transport() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport();
    // The nodes' keepalives keep the connection (and their NAT mappings) alive; answering
    // them is enough. Pings of its own would double a server's idle work (at 1,000 nodes its
    // idle CPU went mostly to keepalives).
    t.keep_alive_interval(None);
    t.max_concurrent_bidi_streams(SERVER_MAX_BIDI_STREAMS.into());
    t.stream_receive_window(SERVER_STREAM_WINDOW.into());
    t.receive_window(SERVER_STREAM_WINDOW.into());
    t.send_window(SERVER_SEND_WINDOW);
    Arc::new(t)
}

/// Transport limits of a node: servers never open streams toward it; one control message at a
/// time in flight.
fn client_transport() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport();
    // Ask the server to acknowledge each ack-eliciting packet at once. A lone keepalive is
    // otherwise acknowledged by a timer `max_ack_delay` later, a second wake-up of the server
    // for every keepalive of every node.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(0u32.into());
    t.ack_frequency_config(Some(acks));
    t.max_concurrent_bidi_streams(0u32.into());
    t.stream_receive_window(CLIENT_STREAM_WINDOW.into());
    t.receive_window(CLIENT_STREAM_WINDOW.into());
    t.send_window(u64::from(SERVER_STREAM_WINDOW));
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server endpoint (controller or standalone relay) on `listen`, with connection IDs and
/// stateless resets derived from `secret` (see [`controller_endpoint_config`]).
pub fn bind_server(
    listen: std::net::SocketAddr,
    secret: &[u8; 32],
) -> Result<quinn::Endpoint, ConfigError> {
    let socket = crate::net::with_ipv4_fallback(listen, crate::net::bind_udp)
        .map_err(|e| err(format!("cannot listen on {listen}: {e}")))?;
    let want = crate::net::SERVER_SOCKET_BUFFER;
    let got = crate::net::size_buffers(&socket, want);
    if got.recv < want || got.send < want {
        tracing::warn!(
            recv = got.recv,
            send = got.send,
            "the kernel gave the UDP socket on {listen} smaller buffers than the {} MiB asked: bursts (many nodes joining, relayed traffic) may be dropped; raise the limits with sysctl -w net.core.rmem_max={want} net.core.wmem_max={want}",
            want >> 20
        );
    }
    quinn::Endpoint::new(
        controller_endpoint_config(secret),
        Some(server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| err(format!("cannot listen on {listen}: {e}")))
}

/// A client-only endpoint on its own socket bound to `bind` (the agent's shared socket uses
/// [`endpoint_config`] with its own socket adapter instead): for one-shot commands and tests.
pub fn bind_client(bind: std::net::SocketAddr) -> Result<quinn::Endpoint, ConfigError> {
    let socket = crate::net::with_ipv4_fallback(bind, crate::net::bind_udp)
        .map_err(|e| err(format!("cannot bind {bind}: {e}")))?;
    // One endpoint may carry many connections (the load tool puts 100 on one).
    crate::net::size_buffers(&socket, crate::net::SERVER_SOCKET_BUFFER);
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| err(format!("cannot bind {bind}: {e}")))?;
    endpoint.set_default_client_config(client_config()?);
    Ok(endpoint)
}

/// TLS 1.3 server settings with a fresh self-signed certificate, offering `alpn`. The
/// certificate proves nothing: the Noise handshake inside proves the server's pinned key.
pub(crate) fn tls_server(alpn: &[u8]) -> Result<rustls::ServerConfig, ConfigError> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["mesh-controller".to_owned()]).map_err(err)?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key.into())
        .map_err(err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// TLS 1.3 client settings that accept any server certificate (see [`NoiseAuthenticated`]),
/// asking for `alpn`. Safe only with the Noise handshake on top; public for tests that speak
/// TLS to a server without it.
pub fn tls_client(alpn: &[u8]) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoiseAuthenticated(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Server configuration with a fresh self-signed certificate.
pub fn server_config() -> Result<quinn::ServerConfig, ConfigError> {
    let tls = tls_server(ALPN)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(err)?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(server_transport());
    c.max_incoming(MAX_INCOMING);
    c.incoming_buffer_size(INCOMING_BUFFER);
    c.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    // Connection migration is how a node survives a NAT rebinding; keep quinn's default (on).
    Ok(c)
}

/// Client configuration. The certificate is not checked against any authority: the Noise
/// handshake that follows proves the controller's pinned key (see the crate docs).
pub fn client_config() -> Result<quinn::ClientConfig, ConfigError> {
    let tls = tls_client(ALPN)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(err)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(client_transport());
    Ok(c)
}

/// Accepts any server certificate but still checks that the handshake signatures are valid for
/// it; authentication of the controller happens in the Noise layer.
#[derive(Debug)]
struct NoiseAuthenticated(Arc<rustls::crypto::CryptoProvider>);

/// A certificate check that accepts any certificate and still checks the handshake's
/// signatures against it: for a TLS peer that something else authenticates (the Noise layer
/// here; a password for libpq's `sslmode=require`).
pub fn any_certificate(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(NoiseAuthenticated(provider))
}

impl rustls::client::danger::ServerCertVerifier for NoiseAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// QUIC application close code: the node's key connected again, and the newer connection
/// replaced this one (one connection per node key).
pub const CLOSE_REPLACED: u32 = 0x4d04;

/// Connection limits of a server (controller or standalone relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once, handshakes included; more are refused (default 10,000).
    pub max_connections: usize,
    /// Connections still in their handshake (QUIC, Noise, first message) beyond which a new
    /// attempt must first prove its address with a QUIC Retry (default 64).
    pub max_unvalidated_handshakes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            max_unvalidated_handshakes: 64,
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead with the handshake.
    Accept,
    /// Send a QUIC Retry: the client must show it receives packets at its source address.
    Retry,
    /// At the connection limit: refuse.
    Refuse,
}

/// The admission rule for one connection attempt: refuse at the connection limit; while many
/// handshakes are in flight, accept only addresses that a Retry has validated.
pub fn decide(
    limits: &ServerLimits,
    connections: usize,
    handshakes: usize,
    validated: bool,
    may_retry: bool,
) -> Decision {
    if connections >= limits.max_connections {
        Decision::Refuse
    } else if !validated && handshakes >= limits.max_unvalidated_handshakes {
        if may_retry {
            Decision::Retry
        } else {
            // A client that already got a Retry but whose token did not validate.
            Decision::Refuse
        }
    } else {
        Decision::Accept
    }
}

/// Totals of a [`Gate`] since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounters {
    /// Connections open now (handshakes included).
    pub connections: usize,
    /// Connections still in their handshake now.
    pub handshakes: usize,
    /// Attempts refused at the connection limit.
    pub refused: u64,
    /// Attempts answered with a Retry.
    pub retried: u64,
}

/// Counts a server's connections and applies [`decide`] to each attempt.
pub struct Gate {
    limits: ServerLimits,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    refused: AtomicU64,
    retried: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// Holds one connection's place in a [`Gate`] until dropped.
pub struct Slot {
    gate: Arc<Gate>,
    handshaking: bool,
}

impl Slot {
    /// The peer is authenticated and admitted: it no longer counts as a handshake.
    pub fn established(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.gate.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.established();
        self.gate.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often a server under its connection limit says so in the log.
const BUSY_WARNING_EVERY: Duration = Duration::from_secs(10);

impl Gate {
    /// A gate with no connections.
    pub fn new(limits: ServerLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// Decides on `incoming`: returns it with its slot when it may proceed, or disposes of it
    /// (Retry or refusal) and returns `None`.
    pub fn admit(self: &Arc<Self>, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Slot)> {
        let connections = self.connections.load(Ordering::Relaxed);
        let handshakes = self.handshakes.load(Ordering::Relaxed);
        match decide(
            &self.limits,
            connections,
            handshakes,
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Decision::Accept => {
                self.connections.fetch_add(1, Ordering::Relaxed);
                self.handshakes.fetch_add(1, Ordering::Relaxed);
                Some((
                    incoming,
                    Slot {
                        gate: self.clone(),
                        handshaking: true,
                    },
                ))
            }
            Decision::Retry => {
                self.retried.fetch_add(1, Ordering::Relaxed);
                if incoming.retry().is_err() {
                    // Cannot happen after `may_retry`; nothing more to do with it.
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Decision::Refuse => {
                let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                let remote = incoming.remote_address();
                incoming.refuse();
                self.warn_busy(remote, connections, total);
                None
            }
        }
    }

    /// Decides on a TCP connection from `remote` (the TCP handshake proved its address, so
    /// no Retry is needed): its slot, or `None` at the connection limit (the caller closes it).
    pub fn admit_tcp(self: &Arc<Self>, remote: std::net::SocketAddr) -> Option<Slot> {
        let connections = self.connections.load(Ordering::Relaxed);
        let handshakes = self.handshakes.load(Ordering::Relaxed);
        match decide(&self.limits, connections, handshakes, true, false) {
            Decision::Accept => {
                self.connections.fetch_add(1, Ordering::Relaxed);
                self.handshakes.fetch_add(1, Ordering::Relaxed);
                Some(Slot {
                    gate: self.clone(),
                    handshaking: true,
                })
            }
            Decision::Retry | Decision::Refuse => {
                let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                self.warn_busy(remote, connections, total);
                None
            }
        }
    }

    fn warn_busy(&self, remote: std::net::SocketAddr, connections: usize, total: u64) {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < BUSY_WARNING_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        warn!(
            %remote,
            connections,
            limit = self.limits.max_connections,
            refused_total = total,
            "refusing connections: the server is at its connection limit; if this many nodes are expected, raise the limit (ServerLimits::max_connections)"
        );
    }

    /// Counters since start.
    pub fn counters(&self) -> GateCounters {
        GateCounters {
            connections: self.connections.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_rule() {
        let l = ServerLimits {
            max_connections: 10,
            max_unvalidated_handshakes: 3,
        };
        assert_eq!(decide(&l, 0, 0, false, true), Decision::Accept);
        assert_eq!(decide(&l, 5, 2, false, true), Decision::Accept);
        // Many handshakes in flight: prove the address first.
        assert_eq!(decide(&l, 5, 3, false, true), Decision::Retry);
        assert_eq!(decide(&l, 5, 3, true, false), Decision::Accept);
        assert_eq!(decide(&l, 5, 3, false, false), Decision::Refuse);
        // At the limit: nobody, validated or not.
        assert_eq!(decide(&l, 10, 0, true, false), Decision::Refuse);
    }

    #[test]
    fn liveness_is_within_ten_seconds() {
        // `mesh status` must show a dead controller within 10 s, even if nothing but QUIC's
        // idle timer noticed. The timer restarts when the first keepalive after the last
        // receipt goes out, so the worst case is both.
        assert!(KEEPALIVE + IDLE_TIMEOUT <= Duration::from_secs(8));
        // A node whose controller died notices within 4 s (`Link::unanswered` samples every
        // quarter second), leaving a second to reach another replica within the 5 s promised.
        assert!(KEEPALIVE + ANSWER_WITHIN + Duration::from_millis(250) <= Duration::from_secs(4));
        // A keepalive whose ack was lost is probed again after one, three and seven probe
        // timeouts (round trip + 4 x its variance + 25 ms of ack delay): on a steady 100 ms
        // path all three go out before the node gives up on its server, on a 300 ms path two.
        let pto = |rtt_ms: u64| Duration::from_millis(rtt_ms + 4 * rtt_ms / 10 + 25);
        assert!(pto(100) * 7 < ANSWER_WITHIN);
        assert!(pto(300) * 3 < ANSWER_WITHIN);
        // A server keeps a node through a lost keepalive and two lost probes on a 300 ms path.
        assert!(KEEPALIVE + pto(300) * 7 < IDLE_TIMEOUT);
        // The next keepalive goes out before the connection could be declared dead.
        assert!(KEEPALIVE < IDLE_TIMEOUT);
    }
}
