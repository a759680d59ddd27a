//! Port mapping: the agent asks the router in front of it (the default gateway) to forward its
//! one UDP port from the router's public address, with PCP (RFC 6887), NAT-PMP (RFC 6886) or
//! UPnP IGD, renews the lease, and removes the mapping when the agent stops (SIGTERM, `mesh
//! leave`). Most home routers and OpenWrt speak at least one of them.
//!
//! The mapped address is one more endpoint candidate, with a place of its own in the node's
//! list ([`crate::candidates::report`]); the control loop tells the controller at once when it
//! comes, changes or goes. It is the one candidate a router forwards whoever sends to it, so a
//! node behind an endpoint-dependent ("symmetric") NAT that holds a mapping can be reached
//! directly even from another symmetric NAT.
//!
//! The task runs beside the daemon and never holds it up: the first round starts with the
//! daemon, on sockets of its own, and nothing waits for it. PCP is asked first; a router that
//! answers PCP with "unsupported version" is asked with NAT-PMP; a router that answers neither
//! (or has no PCP server at all) is looked for with UPnP (SSDP to the gateway and to the
//! multicast group, then SOAP). Most lab routers and clouds speak none of them: then the task
//! logs that once, at info, and asks again quietly at growing intervals ([`retry_delay`]).
//!
//! A mapping is renewed at half its lease, and at least every [`MAX_RENEW`] so that a router
//! that restarted and forgot it is noticed ([`renew_delay`]); a renewal that fails is retried
//! until the lease runs out, and then the mapping is given up and looked for afresh. A change
//! of default gateway or of the local address moves the mapping to the new gateway.
//!
//! Everything the router says is untrusted: a lease is bounded ([`lease_from_router`]), a UPnP
//! answer must come from the default gateway itself, and an external address that is not a
//! public unicast IPv4 address, or is this host's own, is never announced ([`announceable`]);
//! such a mapping is removed at once.

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::PortMappingProtocol;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The lease asked for: NAT-PMP's recommended two hours. Routers may grant another.
pub const LEASE: Duration = Duration::from_secs(2 * 3600);
/// The shortest lease believed: a router's shorter grant counts as this long.
const MIN_LEASE: Duration = Duration::from_secs(60);
/// The longest lease believed: a longer (or permanent) grant counts as this long.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// The shortest time between two renewals of a held mapping.
const MIN_RENEW: Duration = Duration::from_secs(30);
/// The longest time between two renewals: a router that restarted (and forgot the mapping) is
/// noticed within it.
pub const MAX_RENEW: Duration = Duration::from_secs(20 * 60);
/// The first wait before asking again after a round that found nothing; it doubles.
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between two rounds that find nothing.
pub const MAX_RETRY: Duration = Duration::from_secs(30 * 60);
/// The first wait before retrying a renewal that failed; it doubles, up to the lease's end.
const FIRST_RENEW_RETRY: Duration = Duration::from_secs(5);
/// How long PCP and NAT-PMP wait for an answer: 250 ms, then 500 ms, then 1 s (1.75 s in all).
const PMP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};
/// How long the UPnP search waits for an answer.
const UPNP_SEARCH: Duration = Duration::from_secs(2);
/// How long one UPnP request (SOAP over HTTP) may take.
const UPNP_REQUEST: Duration = Duration::from_secs(3);
/// How long removing the mapping may hold up the agent's stop.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
/// What a UPnP mapping is called in the router's list.
const DESCRIPTION: &str = "mesh";
/// SSDP's multicast group and port.
const SSDP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900));

/// A port mapping protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886), PCP's predecessor.
    NatPmp,
    /// UPnP Internet Gateway Device.
    Upnp,
}

impl Protocol {
    /// Its name in `mesh status`, the log and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the port mapping stands, as `mesh status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Turned off (`--no-port-mapping`, `port_mapping = false`).
    Off,
    /// Asking the router; the first round has not ended.
    #[default]
    Searching,
    /// The router maps the port.
    Mapped,
    /// No router answered (or there is no default gateway); asked again now and then.
    Unavailable,
    /// The router mapped the port at an address peers cannot use (private, shared, this
    /// host's own); the mapping was removed.
    Unusable,
}

impl State {
    /// Its name in `mesh status`.
    pub fn name(self) -> &'static str {
        match self {
            State::Off => "off",
            State::Searching => "searching",
            State::Mapped => "mapped",
            State::Unavailable => "unavailable",
            State::Unusable => "unusable",
        }
    }
}

/// What the task last found, for `mesh status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Where it stands.
    pub state: State,
    /// The protocol of the mapping held.
    pub protocol: Option<Protocol>,
    /// The router asked.
    pub gateway: Option<Ipv4Addr>,
    /// The mapped public address.
    pub external: Option<SocketAddrV4>,
    /// The lease the router granted (as believed, see [`lease_from_router`]).
    pub lease: Option<Duration>,
    /// When the lease runs out: by the monotonic clock, and by the wall clock for people.
    pub expires: Option<(Instant, SystemTime)>,
    /// Why the last round or renewal failed.
    pub last_error: Option<String>,
    /// Successful renewals.
    pub renewals: u64,
    /// Rounds and renewals that failed.
    pub failures: u64,
}

impl Snapshot {
    /// The `port_mapping` object of `mesh status --json` at `now`.
    pub fn to_json(&self, now: Instant) -> serde_json::Value {
        let expires_in = self
            .expires
            .map(|(at, _)| at.saturating_duration_since(now).as_secs());
        let expires_at = self
            .expires
            .map(|(_, wall)| humantime::format_rfc3339_seconds(wall).to_string());
        json!({
            "state": self.state.name(),
            "protocol": self.protocol.map_or("none", Protocol::name),
            "gateway": self.gateway.map(|g| g.to_string()),
            "external": self.external.map(|e| e.to_string()),
            "lease_secs": self.lease.map(|l| l.as_secs()),
            "expires_in_secs": expires_in,
            "expires_at": expires_at,
            "last_error": self.last_error,
            "renewals": self.renewals,
            "failures": self.failures,
        })
    }
}

/// The task's status, shared with the local API and the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct PortMapShared {
    status: Arc<Mutex<Snapshot>>,
}

impl PortMapShared {
    /// Status starting in `state` ([`State::Off`] when the task does not run).
    pub fn new(state: State) -> PortMapShared {
        PortMapShared {
            status: Arc::new(Mutex::new(Snapshot {
                state,
                ..Snapshot::default()
            })),
        }
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> Snapshot {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }
}

/// Why an external address is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// Not IPv4 (the overlay's underlay candidates are IPv4).
    #[error("it is not an IPv4 address")]
    NotIpv4,
    /// A private range (RFC 1918): another NAT sits between the router and the internet.
    #[error("it is a private address: another NAT sits between the router and the internet")]
    Private,
    /// Shared address space (RFC 6598): the router sits behind a carrier-grade NAT.
    #[error("it is a carrier-grade NAT address (100.64.0.0/10): the provider's NAT does not forward the port")]
    Shared,
    /// Unspecified, "this network", loopback, link-local, multicast, broadcast or reserved.
    #[error("it is not a unicast address that can be reached across the internet")]
    Special,
    /// This host's own address: there is no NAT to cross.
    #[error(
        "it is this host's own address: there is no NAT in between, and peers already have it"
    )]
    OwnAddress,
}

/// The external address `ip` as a candidate peers may use, or why not: it must be a public
/// unicast IPv4 address other than `local` (this host's address toward the gateway).
///
/// The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) count as public:
/// no router on the internet holds them, and test labs use them for public addresses.
pub fn announceable(ip: IpAddr, local: Ipv4Addr) -> Result<Ipv4Addr, Unusable> {
    let ip = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().ok_or(Unusable::NotIpv4)?,
    };
    let [a, b, c, _] = ip.octets();
    if ip.is_private() {
        return Err(Unusable::Private);
    }
    if a == 100 && (64..128).contains(&b) {
        return Err(Unusable::Shared);
    }
    let special = a == 0
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || a >= 240
        // IETF protocol assignments (DS-Lite's B4 addresses among them).
        || (a, b, c) == (192, 0, 0)
        // Benchmarking (RFC 2544).
        || (a == 198 && (b == 18 || b == 19));
    if special {
        return Err(Unusable::Special);
    }
    if ip == local {
        return Err(Unusable::OwnAddress);
    }
    Ok(ip)
}

/// The lease a router's grant of `secs` seconds counts as: 0 (permanent, UPnP) and anything
/// over [`MAX_LEASE`] as [`MAX_LEASE`], anything under [`MIN_LEASE`] as [`MIN_LEASE`].
pub fn lease_from_router(secs: u32) -> Duration {
    match Duration::from_secs(u64::from(secs)) {
        d if d.is_zero() => MAX_LEASE,
        d => d.clamp(MIN_LEASE, MAX_LEASE),
    }
}

/// How long after a grant of `lease` the mapping is renewed: at half the lease, but no sooner
/// than [`MIN_RENEW`] and no later than [`MAX_RENEW`].
pub fn renew_delay(lease: Duration) -> Duration {
    (lease / 2).clamp(MIN_RENEW, MAX_RENEW)
}

/// How long to wait before the next round after `failures` rounds in a row found nothing:
/// [`FIRST_RETRY`], doubling, at most [`MAX_RETRY`].
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// How long to wait before retrying a renewal after `failures` failed in a row, when the
/// lease runs out in `left`: [`FIRST_RENEW_RETRY`], doubling, and never past the lease's end
/// (plus a second, so that the last try finds it expired).
pub fn renew_retry_delay(failures: u32, left: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RENEW_RETRY
        .saturating_mul(1 << doublings)
        .min(left + Duration::from_secs(1))
}

/// How the router holds the mapping, for renewing and removing it.
enum Held {
    /// PCP or NAT-PMP: crab_nat's mapping (it keeps the PCP nonce renewals need).
    Pmp(PortMapping),
    /// UPnP IGD: the router's control endpoint.
    Upnp(igd_next::aio::Gateway<Tokio>),
}

/// A mapping the router granted.
struct Lease {
    /// How it was asked for.
    protocol: Protocol,
    /// The router that holds it.
    gateway: Ipv4Addr,
    /// This host's address toward the router (the mapping's internal address).
    local: Ipv4Addr,
    /// The agent's UDP port (the mapping's internal port).
    port: NonZeroU16,
    /// Where peers reach the port.
    external: SocketAddrV4,
    /// The lease granted (as believed, see [`lease_from_router`]).
    lease: Duration,
    /// When it was granted or last renewed.
    granted: Instant,
    /// What renewing and removing it need.
    held: Held,
}

impl Lease {
    /// When it runs out unless renewed.
    fn expires(&self) -> Instant {
        self.granted + self.lease
    }

    /// The gateway and local address it was made through (see [`route`]).
    fn route(&self) -> (Ipv4Addr, Ipv4Addr) {
        (self.gateway, self.local)
    }
}

/// Why a round got no usable mapping.
enum Refused {
    /// No protocol worked; why, for each one tried.
    NoAnswer(Vec<(Protocol, String)>),
    /// The router mapped the port at an address peers cannot use (the mapping is removed).
    Unusable {
        /// The protocol that mapped it.
        protocol: Protocol,
        /// The address the router gave.
        external: IpAddr,
        /// Why peers cannot use it.
        why: Unusable,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NoAnswer(tried) => {
                for (i, (p, why)) in tried.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{p}: {why}")?;
                }
                Ok(())
            }
            Refused::Unusable {
                protocol,
                external,
                why,
            } => write!(
                f,
                "{protocol} mapped the port at {external}, which is not announced: {why}"
            ),
        }
    }
}

/// The default gateway and this host's address toward it, or `None` without a default route
/// through a gateway.
async fn route() -> Option<(Ipv4Addr, Ipv4Addr)> {
    let gateway = match mesh_sys::netlink::default_gateway().await {
        Ok(g) => g?,
        Err(e) => {
            debug!(error = %e, "cannot read the default route");
            return None;
        }
    };
    // The address the kernel would send from: connecting a UDP socket sends nothing.
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    match probe.local_addr().ok()?.ip() {
        IpAddr::V4(local) if !local.is_unspecified() => Some((gateway, local)),
        _ => None,
    }
}

/// Asks the router with PCP (NAT-PMP where it says so), then UPnP.
async fn request(gateway: Ipv4Addr, local: Ipv4Addr, port: NonZeroU16) -> Result<Lease, Refused> {
    let mut tried = Vec::new();
    match request_pmp(gateway, local, port).await {
        Ok(lease) => return Ok(lease),
        Err(e @ Refused::Unusable { .. }) => return Err(e),
        Err(Refused::NoAnswer(t)) => tried.extend(t),
    }
    match request_upnp(gateway, local, port).await {
        Ok(lease) => Ok(lease),
        Err(e @ Refused::Unusable { .. }) => Err(e),
        Err(Refused::NoAnswer(t)) => {
            tried.extend(t);
            Err(Refused::NoAnswer(tried))
        }
    }
}

/// PCP and NAT-PMP request options: the same external `port`, [`LEASE`], [`PMP_TIMEOUTS`].
fn pmp_options(port: NonZeroU16) -> PortMappingOptions {
    PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(u32::try_from(LEASE.as_secs()).unwrap_or(u32::MAX)),
        timeout_config: Some(PMP_TIMEOUTS),
    }
}

/// What crab_nat's answer says: the protocol and the external IP (NAT-PMP needs a request of
/// its own for that).
async fn pmp_external(gateway: Ipv4Addr, m: &PortMapping) -> Result<(Protocol, IpAddr), String> {
    match m.mapping_type() {
        PortMappingType::Pcp { external_ip, .. } => Ok((Protocol::Pcp, external_ip)),
        PortMappingType::NatPmp => {
            crab_nat::natpmp::external_address(gateway.into(), Some(PMP_TIMEOUTS))
                .await
                .map(|ip| (Protocol::NatPmp, IpAddr::V4(ip)))
                .map_err(|e| format!("external address: {e}"))
        }
    }
}

/// PCP, falling back to NAT-PMP where the router answers PCP with "unsupported version".
async fn request_pmp(
    gateway: Ipv4Addr,
    local: Ipv4Addr,
    port: NonZeroU16,
) -> Result<Lease, Refused> {
    let mapping = PortMapping::new(
        gateway.into(),
        local.into(),
        InternetProtocol::Udp,
        port,
        pmp_options(port),
    )
    .await
    .map_err(|e| {
        let (p, why) = match e {
            crab_nat::MappingFailure::Pcp(e) => (Protocol::Pcp, e.to_string()),
            crab_nat::MappingFailure::NatPmp(e) => (Protocol::NatPmp, e.to_string()),
        };
        Refused::NoAnswer(vec![(p, why)])
    })?;
    let (protocol, ip) = match pmp_external(gateway, &mapping).await {
        Ok(found) => found,
        Err(why) => {
            let _ = mapping.try_drop().await;
            return Err(Refused::NoAnswer(vec![(Protocol::NatPmp, why)]));
        }
    };
    let external = match announceable(ip, local) {
        Ok(external) => external,
        Err(why) => {
            let _ = mapping.try_drop().await;
            return Err(Refused::Unusable {
                protocol,
                external: ip,
                why,
            });
        }
    };
    Ok(Lease {
        protocol,
        gateway,
        local,
        port,
        external: SocketAddrV4::new(external, mapping.external_port().get()),
        lease: lease_from_router(mapping.lifetime()),
        granted: Instant::now(),
        held: Held::Pmp(mapping),
    })
}

/// Finds the UPnP IGD of `gateway`: SSDP to the gateway itself and to the multicast group at
/// once; the first answer that leads to a control endpoint wins, and it must be the gateway's.
async fn upnp_gateway(
    gateway: Ipv4Addr,
    local: Ipv4Addr,
) -> Result<igd_next::aio::Gateway<Tokio>, String> {
    use futures_util::FutureExt as _;
    let search = |to: SocketAddr| {
        igd_next::aio::tokio::search_gateway(igd_next::SearchOptions {
            bind_addr: SocketAddr::from((local, 0)),
            broadcast_address: to,
            timeout: Some(UPNP_SEARCH),
            single_search_timeout: Some(UPNP_SEARCH),
        })
        .boxed()
    };
    let searches = [search(SocketAddr::from((gateway, 1900))), search(SSDP)];
    let (found, _) = futures_util::future::select_ok(searches)
        .await
        .map_err(|e| match e {
            igd_next::SearchError::NoResponseWithinTimeout => format!(
                "no answer to SSDP within {}",
                humantime::format_duration(UPNP_SEARCH)
            ),
            e => e.to_string(),
        })?;
    if found.addr.ip() != IpAddr::V4(gateway) {
        return Err(format!(
            "the device that answered ({}) is not the default gateway {gateway}",
            found.addr
        ));
    }
    Ok(found)
}

/// Runs one UPnP request with [`UPNP_REQUEST`] as its time limit.
async fn upnp<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(UPNP_REQUEST, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {}",
            humantime::format_duration(UPNP_REQUEST)
        )),
    }
}

/// Maps `port` (the same external port where free, else what the router gives) on the IGD
/// `g`; returns the external port and the lease granted in seconds (0: permanent).
async fn upnp_add(
    g: &igd_next::aio::Gateway<Tokio>,
    local: SocketAddr,
    external: u16,
) -> Result<(u16, u32), String> {
    use igd_next::{AddAnyPortError, AddPortError};
    let secs = u32::try_from(LEASE.as_secs()).unwrap_or(u32::MAX);
    let udp = PortMappingProtocol::UDP;
    match tokio::time::timeout(
        UPNP_REQUEST,
        g.add_port(udp, external, local, secs, DESCRIPTION),
    )
    .await
    {
        Ok(Ok(())) => return Ok((external, secs)),
        Ok(Err(AddPortError::OnlyPermanentLeasesSupported)) => {
            return upnp(
                "add port mapping",
                g.add_port(udp, external, local, 0, DESCRIPTION),
            )
            .await
            .map(|()| (external, 0));
        }
        Ok(Err(AddPortError::PortInUse)) => {}
        Ok(Err(e)) => return Err(format!("add port mapping: {e}")),
        Err(_) => return Err("add port mapping: no answer".into()),
    }
    // Another client holds the port: any port the router gives.
    match tokio::time::timeout(UPNP_REQUEST, g.add_any_port(udp, local, secs, DESCRIPTION)).await {
        Ok(Ok(p)) => Ok((p, secs)),
        Ok(Err(AddAnyPortError::OnlyPermanentLeasesSupported)) => upnp(
            "add port mapping",
            g.add_any_port(udp, local, 0, DESCRIPTION),
        )
        .await
        .map(|p| (p, 0)),
        Ok(Err(e)) => Err(format!("add port mapping: {e}")),
        Err(_) => Err("add port mapping: no answer".into()),
    }
}

/// UPnP IGD: find the gateway's IGD, check its external address, map the port.
async fn request_upnp(
    gateway: Ipv4Addr,
    local: Ipv4Addr,
    port: NonZeroU16,
) -> Result<Lease, Refused> {
    let no = |why: String| Refused::NoAnswer(vec![(Protocol::Upnp, why)]);
    let g = upnp_gateway(gateway, local).await.map_err(no)?;
    let ip = upnp("external address", g.get_external_ip())
        .await
        .map_err(no)?;
    // Checked before mapping: an address peers cannot use is not worth a mapping.
    let external_ip = announceable(ip, local).map_err(|why| Refused::Unusable {
        protocol: Protocol::Upnp,
        external: ip,
        why,
    })?;
    let (external_port, secs) = upnp_add(&g, SocketAddr::from((local, port.get())), port.get())
        .await
        .map_err(no)?;
    if external_port == 0 {
        return Err(no("the router mapped external port 0".into()));
    }
    Ok(Lease {
        protocol: Protocol::Upnp,
        gateway,
        local,
        port,
        external: SocketAddrV4::new(external_ip, external_port),
        lease: lease_from_router(secs),
        granted: Instant::now(),
        held: Held::Upnp(g),
    })
}

/// Renews `lease` in place (the router may move the external address or port).
async fn renew(lease: &mut Lease) -> Result<(), String> {
    let (ip, port, secs) = match &mut lease.held {
        Held::Pmp(m) => {
            m.renew().await.map_err(|e| e.to_string())?;
            let (_, ip) = pmp_external(lease.gateway, m).await?;
            (ip, m.external_port().get(), m.lifetime())
        }
        Held::Upnp(g) => {
            let local = SocketAddr::from((lease.local, lease.port.get()));
            let ip = upnp("external address", g.get_external_ip()).await?;
            let (port, secs) = upnp_add(g, local, lease.external.port()).await?;
            (ip, port, secs)
        }
    };
    let external = announceable(ip, lease.local).map_err(|why| {
        format!("the router now maps the port at {ip}, which is not announced: {why}")
    })?;
    if port == 0 {
        return Err("the router mapped external port 0".into());
    }
    lease.external = SocketAddrV4::new(external, port);
    lease.lease = lease_from_router(secs);
    lease.granted = Instant::now();
    Ok(())
}

/// Asks the router to remove the mapping.
async fn remove(lease: Box<Lease>) -> Result<(), String> {
    match lease.held {
        Held::Pmp(m) => m.try_drop().await.map_err(|(e, _)| e.to_string()),
        Held::Upnp(g) => {
            upnp(
                "delete port mapping",
                g.remove_port(PortMappingProtocol::UDP, lease.external.port()),
            )
            .await
        }
    }
}

/// Where the task is.
enum Phase {
    /// No mapping held; look for one at `at`.
    Search {
        /// When.
        at: Instant,
    },
    /// A mapping is held; renew it at `at`.
    Hold {
        /// The mapping.
        lease: Box<Lease>,
        /// When to renew it.
        at: Instant,
    },
}

/// What the task tells the rest of the agent.
struct Outputs {
    /// Status for `mesh status` and metrics.
    shared: PortMapShared,
    /// The mapped address, for the control loop (which reports it as a candidate).
    mapped: watch::Sender<Option<SocketAddr>>,
}

impl Outputs {
    /// A mapping is held (or renewed).
    fn mapped(&self, lease: &Lease, renewed: bool) {
        let wall = SystemTime::now() + lease.lease;
        self.shared.update(|s| {
            s.state = State::Mapped;
            s.protocol = Some(lease.protocol);
            s.gateway = Some(lease.gateway);
            s.external = Some(lease.external);
            s.lease = Some(lease.lease);
            s.expires = Some((lease.expires(), wall));
            s.last_error = None;
            if renewed {
                s.renewals += 1;
            }
        });
        let external = SocketAddr::V4(lease.external);
        self.mapped.send_if_modified(|m| {
            let changed = *m != Some(external);
            *m = Some(external);
            changed
        });
    }

    /// No mapping is held.
    fn unmapped(&self, state: State, gateway: Option<Ipv4Addr>, error: Option<String>) {
        self.shared.update(|s| {
            *s = Snapshot {
                state,
                gateway,
                failures: s.failures + u64::from(error.is_some()),
                renewals: s.renewals,
                last_error: error,
                ..Snapshot::default()
            };
        });
        self.mapped.send_if_modified(|m| m.take().is_some());
    }

    /// A renewal failed; the mapping is still held until it expires.
    fn renewal_failed(&self, error: String) {
        self.shared.update(|s| {
            s.failures += 1;
            s.last_error = Some(error);
        });
    }
}

/// The task: what it remembers between steps, and one step per [`Phase`].
struct Task {
    /// The agent's UDP port.
    port: NonZeroU16,
    /// Where it tells what it finds.
    out: Outputs,
    /// Rounds in a row that found nothing, or renewals in a row that failed.
    failures: u32,
    /// What the log was last told about the absence of a mapping (said once, then quiet).
    told: Option<String>,
    /// Flips when the agent stops.
    shutdown: watch::Receiver<bool>,
}

/// What a step leads to: the next phase, and whether the agent is stopping.
type Step = (Phase, bool);

impl Task {
    /// Renews the mapping held through the same gateway.
    async fn renew(&mut self, mut lease: Box<Lease>) -> Step {
        let before = lease.external;
        let result = tokio::select! {
            r = renew(&mut lease) => r,
            _ = self.shutdown.changed() => return (Phase::Hold { lease, at: Instant::now() }, true),
        };
        let now = Instant::now();
        let next = match result {
            Ok(()) => {
                self.failures = 0;
                if lease.external != before {
                    info!(protocol = %lease.protocol, from = %before, to = %lease.external, "the router moved the port mapping; peers are told");
                } else {
                    debug!(protocol = %lease.protocol, external = %lease.external, lease = ?lease.lease, "port mapping renewed");
                }
                self.out.mapped(&lease, true);
                let at = now + renew_delay(lease.lease);
                Phase::Hold { lease, at }
            }
            Err(e) if now >= lease.expires() => {
                self.failures = 1;
                self.told = None;
                info!(protocol = %lease.protocol, external = %lease.external, error = %e, "the router no longer renews the port mapping; peers are told, and it is looked for again");
                self.out
                    .unmapped(State::Unavailable, Some(lease.gateway), Some(e));
                Phase::Search {
                    at: now + retry_delay(self.failures),
                }
            }
            Err(e) => {
                self.failures += 1;
                debug!(protocol = %lease.protocol, error = %e, "port mapping renewal failed; retrying while the lease lasts");
                self.out.renewal_failed(e);
                let left = lease.expires().saturating_duration_since(now);
                let at = now + renew_retry_delay(self.failures, left);
                Phase::Hold { lease, at }
            }
        };
        (next, false)
    }

    /// The route changed under a held mapping (another gateway or local address): the old
    /// mapping goes, a new one is asked for at once.
    async fn moved(&mut self, lease: Box<Lease>, gateway: Option<Ipv4Addr>) -> Step {
        info!(was = %lease.gateway, now = ?gateway, "the route to the internet changed; the port mapping moves to the new gateway");
        let removed = tokio::time::timeout(REMOVE_TIMEOUT, remove(lease))
            .await
            .unwrap_or_else(|_| Err("no answer".into()));
        if let Err(e) = removed {
            debug!(error = %e, "the old gateway did not remove the port mapping");
        }
        self.out.unmapped(State::Searching, gateway, None);
        self.failures = 0;
        self.told = None;
        (Phase::Search { at: Instant::now() }, false)
    }

    /// One round of asking the router `here` (`None`: there is no gateway to ask).
    async fn search(&mut self, here: Option<(Ipv4Addr, Ipv4Addr)>) -> Step {
        let result = match here {
            None => Err(None),
            Some((gateway, local)) => tokio::select! {
                r = request(gateway, local, self.port) => r.map_err(Some),
                // A mapping granted just now expires by itself.
                _ = self.shutdown.changed() => return (Phase::Search { at: Instant::now() }, true),
            },
        };
        let now = Instant::now();
        let refused = match result {
            Ok(lease) => {
                self.failures = 0;
                self.told = None;
                info!(protocol = %lease.protocol, external = %lease.external, gateway = %lease.gateway, lease = %humantime::format_duration(lease.lease), "the router maps the UDP port: peers may reach this node at {}", lease.external);
                self.out.mapped(&lease, false);
                let at = now + renew_delay(lease.lease);
                return (
                    Phase::Hold {
                        lease: Box::new(lease),
                        at,
                    },
                    false,
                );
            }
            Err(refused) => refused,
        };
        self.failures += 1;
        let gateway = here.map(|h| h.0);
        let (state, why) = match &refused {
            None => (
                State::Unavailable,
                "no default route through a gateway".to_owned(),
            ),
            Some(r @ Refused::NoAnswer(_)) => (State::Unavailable, r.to_string()),
            Some(r @ Refused::Unusable { .. }) => (State::Unusable, r.to_string()),
        };
        // Said once (at info) per kind of absence; quiet after that.
        let summary = match (&refused, gateway) {
            (Some(Refused::NoAnswer(_)), Some(g)) => {
                format!("the gateway {g} answers none of PCP, NAT-PMP and UPnP IGD")
            }
            _ => why.clone(),
        };
        if self.told.as_ref() == Some(&summary) {
            debug!(details = %why, "still no port mapping");
        } else if summary == why {
            info!("no port mapping: {summary}; asking again now and then");
        } else {
            info!(details = %why, "no port mapping: {summary}; asking again now and then");
        }
        self.told = Some(summary);
        self.out.unmapped(state, gateway, Some(why));
        (
            Phase::Search {
                at: now + retry_delay(self.failures),
            },
            false,
        )
    }
}

/// Keeps a mapping of UDP `port` at the default gateway until `shutdown` flips, then removes
/// it. Status goes to `shared`, the mapped address (peers may use it) to `mapped`.
pub async fn run(
    port: u16,
    shared: PortMapShared,
    mapped: watch::Sender<Option<SocketAddr>>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(port) = NonZeroU16::new(port) else {
        return;
    };
    let mut task = Task {
        port,
        out: Outputs { shared, mapped },
        failures: 0,
        told: None,
        shutdown,
    };
    let mut phase = Phase::Search { at: Instant::now() };
    loop {
        let at = match &phase {
            Phase::Search { at } | Phase::Hold { at, .. } => *at,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            _ = task.shutdown.changed() => break,
        }
        let here = route().await;
        let stopping;
        (phase, stopping) = match phase {
            Phase::Hold { lease, .. } if here == Some(lease.route()) => task.renew(lease).await,
            Phase::Hold { lease, .. } => task.moved(lease, here.map(|h| h.0)).await,
            Phase::Search { .. } => task.search(here).await,
        };
        if stopping {
            break;
        }
    }
    if let Phase::Hold { lease, .. } = phase {
        let (protocol, external) = (lease.protocol, lease.external);
        match tokio::time::timeout(REMOVE_TIMEOUT, remove(lease)).await {
            Ok(Ok(())) => info!(%protocol, %external, "port mapping removed"),
            Ok(Err(e)) => {
                warn!(%protocol, %external, error = %e, "the router did not remove the port mapping; it expires by itself")
            }
            Err(_) => {
                warn!(%protocol, %external, "the router did not answer the removal of the port mapping in time; it expires by itself")
            }
        }
    }
    task.out.unmapped(State::Off, None, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);

    #[test]
    fn only_public_unicast_ipv4_is_announced() {
        for public in ["8.8.8.8", "81.2.69.160", "203.0.113.100", "198.51.100.7"] {
            assert_eq!(
                announceable(ip(public), LOCAL),
                Ok(public.parse().unwrap()),
                "{public}"
            );
        }
        // PCP carries IPv4 as an IPv4-mapped IPv6 address.
        assert_eq!(
            announceable(ip("::ffff:81.2.69.160"), LOCAL),
            Ok(Ipv4Addr::new(81, 2, 69, 160))
        );
        for (addr, why) in [
            ("10.1.2.3", Unusable::Private),
            ("172.16.0.1", Unusable::Private),
            ("172.31.255.254", Unusable::Private),
            ("192.168.0.1", Unusable::Private),
            ("100.64.0.1", Unusable::Shared),
            ("100.127.255.254", Unusable::Shared),
            ("0.0.0.0", Unusable::Special),
            ("0.1.2.3", Unusable::Special),
            ("127.0.0.1", Unusable::Special),
            ("169.254.1.1", Unusable::Special),
            ("224.0.0.1", Unusable::Special),
            ("239.255.255.250", Unusable::Special),
            ("240.0.0.1", Unusable::Special),
            ("255.255.255.255", Unusable::Special),
            ("192.0.0.2", Unusable::Special),
            ("198.18.0.1", Unusable::Special),
            ("2001:db8::1", Unusable::NotIpv4),
            ("::", Unusable::NotIpv4),
        ] {
            assert_eq!(announceable(ip(addr), LOCAL), Err(why), "{addr}");
        }
        // Just outside the refused ranges.
        for edge in [
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.20.0.0",
        ] {
            assert!(announceable(ip(edge), LOCAL).is_ok(), "{edge}");
        }
        // The host's own (public) address: no NAT to cross.
        let own = Ipv4Addr::new(81, 2, 69, 160);
        assert_eq!(
            announceable(IpAddr::V4(own), own),
            Err(Unusable::OwnAddress)
        );
        // Every refusal says why in words.
        assert!(Unusable::Shared.to_string().contains("carrier-grade NAT"));
    }

    #[test]
    fn a_routers_lease_is_bounded() {
        assert_eq!(lease_from_router(7200), LEASE);
        assert_eq!(lease_from_router(0), MAX_LEASE, "permanent");
        assert_eq!(lease_from_router(1), MIN_LEASE);
        assert_eq!(lease_from_router(u32::MAX), MAX_LEASE);
        assert_eq!(lease_from_router(120), Duration::from_secs(120));
    }

    #[test]
    fn renewals_come_at_half_the_lease_within_bounds() {
        assert_eq!(renew_delay(LEASE), MAX_RENEW, "two hours: capped at 20 min");
        assert_eq!(
            renew_delay(Duration::from_secs(600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(120)),
            Duration::from_secs(60)
        );
        assert_eq!(renew_delay(MIN_LEASE), MIN_RENEW);
        assert_eq!(renew_delay(Duration::ZERO), MIN_RENEW);
        // Every believed lease is renewed before it runs out.
        for secs in [0, 1, 59, 60, 61, 120, 3600, 7200, 86400, u32::MAX] {
            let lease = lease_from_router(secs);
            assert!(renew_delay(lease) < lease, "{secs}");
        }
    }

    #[test]
    fn searches_back_off_and_renewals_retry_until_the_lease_ends() {
        let waits: Vec<u64> = (1..=8).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1800, 1800]);
        assert_eq!(retry_delay(0), FIRST_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
        let long = Duration::from_secs(3600);
        let waits: Vec<u64> = (1..=5)
            .map(|f| renew_retry_delay(f, long).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80]);
        // Near the end of the lease: one more try just after it runs out.
        assert_eq!(
            renew_retry_delay(9, Duration::from_secs(3)),
            Duration::from_secs(4)
        );
        assert_eq!(renew_retry_delay(1, Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn status_shows_protocol_address_and_expiry() {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Snapshot {
            state: State::Mapped,
            protocol: Some(Protocol::NatPmp),
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
            external: Some("81.2.69.160:51820".parse().unwrap()),
            lease: Some(LEASE),
            expires: Some((now + Duration::from_secs(100), wall)),
            last_error: None,
            renewals: 2,
            failures: 1,
        };
        let v = s.to_json(now);
        assert_eq!(v["state"], "mapped");
        assert_eq!(v["protocol"], "nat-pmp");
        assert_eq!(v["gateway"], "192.168.1.1");
        assert_eq!(v["external"], "81.2.69.160:51820");
        assert_eq!(v["lease_secs"], 7200);
        assert_eq!(v["expires_in_secs"], 100);
        assert_eq!(v["expires_at"], "2027-01-15T08:00:00Z");
        assert_eq!(v["renewals"], 2);
        // Nothing held: protocol "none", no address, no expiry.
        let v = Snapshot {
            state: State::Unavailable,
            last_error: Some("pcp: no answer".into()),
            ..Snapshot::default()
        }
        .to_json(now);
        assert_eq!(v["state"], "unavailable");
        assert_eq!(v["protocol"], "none");
        assert!(v["external"].is_null() && v["expires_at"].is_null());
        assert_eq!(v["last_error"], "pcp: no answer");
        assert_eq!(
            PortMapShared::new(State::Off).snapshot().to_json(now)["state"],
            "off"
        );
    }

    #[test]
    fn refusals_name_each_protocol() {
        let r = Refused::NoAnswer(vec![
            (Protocol::Pcp, "no answer".into()),
            (Protocol::Upnp, "no answer to SSDP".into()),
        ]);
        assert_eq!(r.to_string(), "pcp: no answer; upnp: no answer to SSDP");
        let r = Refused::Unusable {
            protocol: Protocol::Upnp,
            external: ip("100.64.3.4"),
            why: Unusable::Shared,
        };
        assert!(
            r.to_string()
                .starts_with("upnp mapped the port at 100.64.3.4"),
            "{r}"
        );
    }

    /// The task reports and publishes what it holds, and forgets it cleanly.
    #[test]
    fn outputs_publish_the_mapped_address_once() {
        let (tx, mut rx) = watch::channel(None);
        let out = Outputs {
            shared: PortMapShared::new(State::Searching),
            mapped: tx,
        };
        out.unmapped(State::Unavailable, None, Some("no gateway".into()));
        assert!(!rx.has_changed().unwrap(), "nothing held, nothing to tell");
        assert_eq!(out.shared.snapshot().failures, 1);
        // (A lease needs a router; the status and channel rules are what is tested.)
        out.shared.update(|s| {
            s.state = State::Mapped;
            s.external = Some("81.2.69.160:51820".parse().unwrap());
        });
        out.mapped
            .send_replace(Some("81.2.69.160:51820".parse().unwrap()));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        out.unmapped(State::Off, None, None);
        assert!(rx.has_changed().unwrap(), "losing the mapping is told");
        assert_eq!(*rx.borrow_and_update(), None);
        let s = out.shared.snapshot();
        assert_eq!((s.state, s.external, s.failures), (State::Off, None, 1));
    }
}
