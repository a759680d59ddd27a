//! QUIC configuration shared by agents and the controller.

use std::sync::Arc;
use std::time::Duration;

/// ALPN of the mesh control protocol.
pub const ALPN: &[u8] = b"mesh/1";
/// QUIC keepalive: well under common NAT UDP timeouts.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Bytes of relayed datagrams queued per connection and direction.
pub const RELAY_BUFFER: usize = 512 * 1024;
/// A control connection that hears nothing for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Building a QUIC configuration failed.
#[derive(Debug, thiserror::Error)]
#[error("QUIC/TLS configuration: {0}")]
pub struct ConfigError(String);

fn err(e: impl std::fmt::Display) -> ConfigError {
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

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE));
    // Relayed WireGuard messages travel as datagrams. These buffers bound what one node can
    // have queued at the relay (and the relay at a node); when full, the oldest go first.
    t.datagram_receive_buffer_size(Some(RELAY_BUFFER));
    t.datagram_send_buffer_size(RELAY_BUFFER);
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
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
    let socket = std::net::UdpSocket::bind(listen)
        .map_err(|e| err(format!("cannot listen on {listen}: {e}")))?;
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
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|e| err(format!("cannot bind {bind}: {e}")))?;
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

/// Server configuration with a fresh self-signed certificate.
pub fn server_config() -> Result<quinn::ServerConfig, ConfigError> {
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(err)?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// Client configuration. The certificate is not checked against any authority: the Noise
/// handshake that follows proves the controller's pinned key (see the crate docs).
pub fn client_config() -> Result<quinn::ClientConfig, ConfigError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoiseAuthenticated(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(err)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// Accepts any server certificate but still checks that the handshake signatures are valid for
/// it; authentication of the controller happens in the Noise layer.
#[derive(Debug)]
struct NoiseAuthenticated(Arc<rustls::crypto::CryptoProvider>);

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
