//! Reaching the controller or a relay over whatever gets through.
//!
//! QUIC on the node's one UDP socket comes first: it shares the socket with WireGuard, so the
//! server sees the very mapping peers will use. When QUIC has not answered within
//! [`QUIC_HEAD_START`], TLS over TCP ([`mesh_control::tcp`], port 443 by default) starts beside
//! it, and whichever link is up first wins (happy eyeballs). Over TCP the node honours
//! `HTTPS_PROXY` / `https_proxy` (HTTP CONNECT) and `NO_PROXY` / `no_proxy`, and never uses a
//! proxy reached through the overlay (clusters run proxies inside it: the overlay would carry
//! its own control traffic, and die with it).
//!
//! Once up, a link is watched ([`Dialer::better`]): a QUIC link whose server leaves what it sent
//! unanswered for [`QUIC_QUIET`] gets a TCP link beside it, taken if it comes up while QUIC
//! stays quiet; so does a QUIC link that loses [`QUIC_LOSSY`] or more of its packets
//! over [`LOSS_WINDOW`] (UDP dropped in part: the relayed traffic on it suffers while TCP would
//! carry it whole). A TCP link has QUIC tried again every [`QUIC_RETRY`], and QUIC is taken back
//! as soon as it answers; after a move for loss the next try waits [`LOSSY_RETRY`], doubling
//! each time QUIC turns out lossy again within that long, up to [`MAX_LOSSY_RETRY`].

use mesh_control::tcp::{self, Proxy};
use mesh_control::{Link, Transport};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How long QUIC has alone before TCP starts beside it.
pub const QUIC_HEAD_START: Duration = Duration::from_secs(2);
/// A QUIC link whose server has left what it was sent unanswered for this long is suspect: the
/// server acknowledges each packet at once, so a healthy link hears back within a round trip.
/// At [`mesh_control::quic::ANSWER_WITHIN`] the link is given up ([`Link::unanswered`]).
pub const QUIC_QUIET: Duration = Duration::from_millis(1000);
/// While on TCP, QUIC is tried again this often.
pub const QUIC_RETRY: Duration = Duration::from_secs(15);
/// A QUIC link that loses this share of its packets over [`LOSS_WINDOW`] moves to TCP.
pub const QUIC_LOSSY: f64 = 0.10;
/// The window over which a QUIC link's loss is judged.
pub const LOSS_WINDOW: Duration = Duration::from_secs(10);
/// Fewest packets sent in the window for its loss to count.
const MIN_LOSS_SAMPLE: u64 = 50;
/// After a move to TCP for loss, QUIC is tried again after this long at first.
pub const LOSSY_RETRY: Duration = Duration::from_secs(60);
/// Longest wait before QUIC is tried again after moves for loss.
pub const MAX_LOSSY_RETRY: Duration = Duration::from_secs(480);
/// How long a background QUIC attempt may take.
const QUIC_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a link's receive counter is sampled.
const SAMPLE: Duration = mesh_control::link::WATCH_SAMPLE;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` of its QUIC (UDP) side.
    pub quic: String,
    /// `host:port` of its TCP side.
    pub tcp: String,
    /// TLS server name on QUIC.
    pub server_name: &'static str,
}

impl Target {
    /// A server at `quic`, with its TCP side at `tcp` or, when unknown (an older token or
    /// relay list), on [`tcp::DEFAULT_PORT`] of the same host.
    pub fn new(quic: &str, tcp: Option<&str>, server_name: &'static str) -> Target {
        let tcp = match tcp {
            Some(t) => t.to_owned(),
            None => {
                let host = quic.rsplit_once(':').map_or(quic, |(h, _)| h);
                format!("{host}:{}", tcp::DEFAULT_PORT)
            }
        };
        Target {
            quic: quic.to_owned(),
            tcp,
            server_name,
        }
    }
}

/// The proxy settings from the environment.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    /// `HTTPS_PROXY`, parsed.
    pub https: Option<Proxy>,
    /// `NO_PROXY` entries: host names, `.domain` suffixes, IPs, CIDRs, or `*`.
    pub no_proxy: Vec<String>,
}

fn env_either(upper: &str, lower: &str) -> Option<String> {
    std::env::var(lower)
        .ok()
        .or_else(|| std::env::var(upper).ok())
        .filter(|v| !v.trim().is_empty())
}

impl ProxyEnv {
    /// Reads `https_proxy`/`HTTPS_PROXY` and `no_proxy`/`NO_PROXY`; an unusable proxy URL is
    /// logged and ignored.
    pub fn from_env() -> ProxyEnv {
        let https = env_either("HTTPS_PROXY", "https_proxy").and_then(|url| {
            Proxy::parse(&url)
                .inspect_err(|e| warn!(error = %e, "HTTPS_PROXY ignored"))
                .ok()
        });
        let no_proxy = env_either("NO_PROXY", "no_proxy")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        ProxyEnv { https, no_proxy }
    }

    /// The proxy for `host` (a name or an IP), unless `NO_PROXY` exempts it.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        let proxy = self.https.as_ref()?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        let exempt = self.no_proxy.iter().any(|entry| {
            let entry = entry.split_once(':').map_or(entry.as_str(), |(h, _)| h);
            if entry == "*" {
                return true;
            }
            if let (Some(ip), Ok(net)) = (ip, entry.parse::<ipnet::IpNet>()) {
                return net.contains(&ip);
            }
            if let (Some(ip), Ok(e)) = (ip, entry.parse::<IpAddr>()) {
                return ip == e;
            }
            let suffix = entry.trim_start_matches('.');
            host == suffix || host.ends_with(&format!(".{suffix}"))
        });
        (!exempt).then_some(proxy)
    }
}

/// Opens links to servers.
#[derive(Clone)]
pub struct Dialer {
    /// The QUIC endpoint on the node's shared socket.
    pub endpoint: quinn::Endpoint,
    /// The firewall mark for TCP sockets (see `mesh_sys::bypass`), if the node can set it.
    pub mark: Option<u32>,
    /// Proxy settings.
    pub proxy: ProxyEnv,
    /// The overlay interface, whose routes a proxy may not be behind.
    pub interface: String,
    /// The overlay range, once known.
    pub overlay: Option<ipnet::Ipv4Net>,
    /// QUIC did not get through last time: TCP starts beside it at once, without the head
    /// start (QUIC still wins if it answers first, and is retried in the background).
    pub tcp_first: Arc<AtomicBool>,
    /// After moves to TCP for loss: when the last one was, and how long to wait before QUIC
    /// is tried again.
    pub lossy: Arc<std::sync::Mutex<Option<(Instant, Duration)>>>,
}

impl Dialer {
    /// QUIC only, within `timeout`.
    pub async fn quic(&self, target: &Target, timeout: Duration) -> Result<Link, String> {
        let attempt = async {
            let addr = resolve(&target.quic).await?;
            let conn = self
                .endpoint
                .connect(addr, target.server_name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            Ok(Link::Quic(conn))
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{NO_QUIC_ANSWER} {}",
                    humantime::format_duration(timeout)
                ))
            })
    }

    /// Why QUIC to `target` got no answer, in the kernel's words where it has some (quinn only
    /// sees silence).
    async fn quic_silence(&self, target: &Target) -> String {
        match resolve(&target.quic).await {
            Ok(addr) => udp_silence(addr, self.mark.is_some()).await,
            Err(e) => e,
        }
    }

    /// TCP only (through the proxy, if one applies and may be used).
    pub async fn tcp(&self, target: &Target) -> Result<Link, String> {
        let host = target
            .tcp
            .rsplit_once(':')
            .map_or(target.tcp.as_str(), |(h, _)| h);
        let proxy = match self.proxy.for_host(host) {
            Some(p) if self.reached_through_overlay(p).await => {
                warn!(proxy = %p.addr, "HTTPS_PROXY is reached through the overlay; not using it for mesh's own connections");
                None
            }
            p => p.cloned(),
        };
        let dialer = tcp::Dialer {
            mark: self.mark,
            proxy,
        };
        tcp::connect(&dialer, &target.tcp)
            .await
            .map(Link::Tcp)
            .map_err(|e| e.to_string())
    }

    /// Whether the proxy's address is inside the overlay or behind a route through it.
    async fn reached_through_overlay(&self, proxy: &Proxy) -> bool {
        let Ok(addrs) = tokio::net::lookup_host(&proxy.addr).await else {
            return false;
        };
        let addrs: Vec<SocketAddr> = addrs.collect();
        let excluded = match mesh_sys::netlink::overlay_view(&self.interface, self.overlay).await {
            Ok(view) => view.excluded,
            Err(_) => self.overlay.into_iter().map(ipnet::IpNet::V4).collect(),
        };
        addrs.iter().any(|a| {
            let ip = a.ip().to_canonical();
            excluded.iter().any(|net| net.contains(&ip)) && !ip.is_loopback()
        })
    }

    /// Happy eyeballs: QUIC, then TCP beside it after [`QUIC_HEAD_START`] (at once if QUIC
    /// fails sooner); the first link up wins. Fails when both failed or `timeout` passed.
    pub async fn connect(&self, target: &Target, timeout: Duration) -> Result<Link, DialError> {
        let started = Instant::now();
        let quic = self.quic(target, timeout);
        tokio::pin!(quic);
        let head_start = tokio::time::sleep(if self.tcp_first.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            QUIC_HEAD_START
        });
        tokio::pin!(head_start);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        type Attempt<'a> =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<Link, String>> + Send + 'a>>;
        let mut tcp: Option<Attempt<'_>> = None;
        let (mut quic_err, mut tcp_err) = (None, None);
        loop {
            tokio::select! {
                r = &mut quic, if quic_err.is_none() => match r {
                    Ok(link) => return Ok(link),
                    Err(e) => {
                        debug!(target = %target.quic, error = %e, "QUIC failed");
                        quic_err = Some(e);
                        // No reason to wait out the head start.
                        if tcp.is_none() {
                            tcp = Some(Box::pin(self.tcp(target)));
                        }
                    }
                },
                _ = &mut head_start, if tcp.is_none() => {
                    debug!(target = %target.quic, "no QUIC answer yet; trying TCP beside it");
                    tcp = Some(Box::pin(self.tcp(target)));
                }
                r = async {
                    match tcp.as_mut() {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                }, if tcp.is_some() && tcp_err.is_none() => match r {
                    Ok(link) => {
                        info!(target = %target.tcp, after_ms = started.elapsed().as_millis() as u64, "connected over TCP (QUIC did not answer)");
                        return Ok(link);
                    }
                    Err(e) => {
                        debug!(target = %target.tcp, error = %e, "TCP failed");
                        tcp_err = Some(e);
                    }
                },
                _ = &mut deadline => {
                    let quic = match quic_err {
                        Some(e) if !e.starts_with(NO_QUIC_ANSWER) => e,
                        _ => self.quic_silence(target).await,
                    };
                    return Err(DialError::Timeout { quic: Some(quic), tcp: tcp_err });
                }
            }
            if let (Some(quic), Some(tcp)) = (&quic_err, &tcp_err) {
                return Err(DialError::Failed {
                    quic: quic.clone(),
                    tcp: tcp.clone(),
                });
            }
        }
    }

    /// Resolves with a better link to `target` than `current`, and never otherwise (see the
    /// module docs).
    pub async fn better(&self, target: &Target, current: &Link) -> Link {
        match current.transport() {
            Transport::Quic => loop {
                let lossy = tokio::select! {
                    _ = self.quiet(current) => {
                        debug!(target = %target.quic, "QUIC link quiet; trying TCP beside it");
                        false
                    }
                    loss = self.lossy(current) => {
                        info!(target = %target.quic, loss = format_args!("{:.0} %", loss * 100.0), "QUIC link loses packets; trying TCP beside it");
                        true
                    }
                };
                if lossy {
                    match self.tcp(target).await {
                        Ok(link) => {
                            self.note_lossy_move();
                            info!(target = %target.tcp, "QUIC lost too much; moving to TCP");
                            return link;
                        }
                        Err(e) => {
                            debug!(error = %e, "TCP failed; staying on QUIC");
                            tokio::time::sleep(LOSS_WINDOW).await;
                            continue;
                        }
                    }
                }
                let tcp = self.tcp(target);
                tokio::pin!(tcp);
                let heard = self.heard(current);
                tokio::pin!(heard);
                tokio::select! {
                    r = &mut tcp => match r {
                        Ok(link) => {
                            info!(target = %target.tcp, "QUIC went quiet; moving to TCP");
                            return link;
                        }
                        Err(e) => {
                            debug!(error = %e, "TCP failed too");
                            tokio::time::sleep(QUIC_HEAD_START).await;
                        }
                    },
                    _ = &mut heard => debug!("QUIC link heard again"),
                }
            },
            Transport::Tcp => loop {
                // Jitter keeps many nodes of one network from retrying in step.
                let jitter = Duration::from_millis(rand::random::<u64>() % 3000);
                let wait = self.lossy_wait().unwrap_or(QUIC_RETRY);
                tokio::time::sleep(wait + jitter).await;
                match self.quic(target, QUIC_PROBE_TIMEOUT).await {
                    Ok(link) => {
                        info!(target = %target.quic, "QUIC answers again; moving back from TCP");
                        return link;
                    }
                    Err(e) => debug!(error = %e, "QUIC still does not answer"),
                }
            },
        }
    }

    /// Resolves with the loss once `link` (QUIC) lost [`QUIC_LOSSY`] or more of the packets it
    /// sent over the last [`LOSS_WINDOW`]; never on a link that does not count losses.
    async fn lossy(&self, link: &Link) -> f64 {
        let Some(first) = link.packet_loss_counters() else {
            return std::future::pending().await;
        };
        let mut samples = std::collections::VecDeque::from([first]);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(now) = link.packet_loss_counters() else {
                return std::future::pending().await;
            };
            samples.push_back(now);
            while samples.len() as u64 > LOSS_WINDOW.as_secs() + 1 {
                samples.pop_front();
            }
            let (sent0, lost0) = samples[0];
            let (sent, lost) = (now.0 - sent0, now.1.saturating_sub(lost0));
            let full = samples.len() as u64 > LOSS_WINDOW.as_secs();
            if full && sent >= MIN_LOSS_SAMPLE {
                let loss = lost as f64 / sent as f64;
                if loss >= QUIC_LOSSY {
                    return loss;
                }
            }
        }
    }

    /// Records a move to TCP for loss: the next QUIC try waits [`LOSSY_RETRY`], doubled if the
    /// last such move was recent (QUIC came back and was lossy again).
    fn note_lossy_move(&self) {
        let mut lossy = self.lossy.lock().unwrap_or_else(|p| p.into_inner());
        let wait = match *lossy {
            Some((at, wait)) if at.elapsed() < wait * 2 + LOSS_WINDOW * 2 => {
                (wait * 2).min(MAX_LOSSY_RETRY)
            }
            _ => LOSSY_RETRY,
        };
        *lossy = Some((Instant::now(), wait));
    }

    /// How long to wait before trying QUIC again after a move for loss, if one was recent.
    fn lossy_wait(&self) -> Option<Duration> {
        let lossy = self.lossy.lock().unwrap_or_else(|p| p.into_inner());
        let (at, wait) = (*lossy)?;
        (at.elapsed() < wait * 2 + LOSS_WINDOW * 2).then_some(wait)
    }

    /// Resolves once `link` has left what it sent unanswered for [`QUIC_QUIET`].
    async fn quiet(&self, link: &Link) {
        link.unanswered(QUIC_QUIET).await
    }

    /// Resolves once `link` receives something.
    async fn heard(&self, link: &Link) {
        let last = link.received();
        while link.received() == last {
            tokio::time::sleep(SAMPLE).await;
        }
    }
}

/// Neither transport got through.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// Both failed.
    #[error("over QUIC (UDP): {quic}; over TCP: {tcp}")]
    Failed {
        /// QUIC's error.
        quic: String,
        /// TCP's error.
        tcp: String,
    },
    /// Time ran out.
    #[error("no answer in time (QUIC: {}; TCP: {})", quic.as_deref().unwrap_or("no answer"), tcp.as_deref().unwrap_or("no answer"))]
    Timeout {
        /// QUIC's error, if it failed.
        quic: Option<String>,
        /// TCP's error, if it failed.
        tcp: Option<String>,
    },
}

/// Why a UDP server stays silent, as far as the kernel can tell: no route to it (a UDP socket
/// cannot even connect), an ICMP error (a datagram sent to it comes back refused: nothing
/// listens on the port; or the host is unreachable), or nothing at all. One empty datagram
/// goes to `addr` (a QUIC server drops it unread).
pub(crate) async fn udp_silence(addr: SocketAddr, marked: bool) -> String {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return "no answer".to_owned();
    };
    if marked {
        // Routed like mesh's own packets: never into the overlay.
        let _ = mesh_sys::bypass::mark_socket(&socket);
    }
    let said = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => format!(
            "ICMP port unreachable: nothing listens on UDP port {} at {}",
            addr.port(),
            addr.ip()
        ),
        std::io::ErrorKind::NetworkUnreachable => {
            format!("no route to {} ({e})", addr.ip())
        }
        std::io::ErrorKind::HostUnreachable => format!("host {} unreachable ({e})", addr.ip()),
        _ => e.to_string(),
    };
    if let Err(e) = socket.connect(addr).await {
        return said(e);
    }
    if let Err(e) = socket.send(&[]).await {
        return said(e);
    }
    let mut buf = [0u8; 16];
    match tokio::time::timeout(UDP_ERROR_WAIT, socket.recv(&mut buf)).await {
        Ok(Err(e)) => said(e),
        _ => format!("no answer from {addr} (UDP may be filtered on the way)"),
    }
}

/// How [`Dialer::quic`]'s error starts when QUIC only met silence (the kernel may know more:
/// [`udp_silence`]).
const NO_QUIC_ANSWER: &str = "no QUIC answer within";

/// How long [`udp_silence`] waits for an ICMP error to come back.
const UDP_ERROR_WAIT: Duration = Duration::from_millis(500);

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .map(mesh_control::net::canonical)
        .collect();
    // In the resolver's order (IPv6 first where the host has IPv6), the first this host has
    // a route to; with none, the first one's routing error.
    let mut first_error = None;
    for a in &all {
        match routable(*a) {
            Ok(()) => return Ok(*a),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| format!("{addr} has no address")))
}

/// Fails at once when this host has no route to `addr` (a UDP `connect` asks the kernel and
/// sends nothing): an IPv6-only host has none to a controller's IPv4 address, and QUIC would
/// only wait out its whole timeout before the next address is tried.
fn routable(addr: SocketAddr) -> Result<(), String> {
    let any: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let family = if addr.is_ipv6() { "IPv6" } else { "IPv4" };
    let socket = std::net::UdpSocket::bind(any)
        .map_err(|e| format!("this host has no {family} ({e}), so {addr} cannot be reached"))?;
    socket
        .connect(addr)
        .map_err(|e| format!("no route to {addr} ({e}): this host has no {family} path there"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn moves_for_loss_back_off_doubling() {
        let dialer = Dialer {
            endpoint: mesh_control::quic::bind_client("127.0.0.1:0".parse().unwrap()).unwrap(),
            mark: None,
            proxy: ProxyEnv::default(),
            interface: "mesh-test0".into(),
            overlay: None,
            tcp_first: Default::default(),
            lossy: Default::default(),
        };
        assert_eq!(dialer.lossy_wait(), None, "QUIC retried at the usual pace");
        let mut waits = Vec::new();
        for _ in 0..5 {
            dialer.note_lossy_move();
            waits.push(dialer.lossy_wait().unwrap().as_secs());
        }
        assert_eq!(waits, [60, 120, 240, 480, 480]);
    }

    #[test]
    fn tcp_side_defaults_to_443_of_the_host() {
        let t = Target::new("192.0.2.1:7443", None, "mesh-controller");
        assert_eq!(t.tcp, "192.0.2.1:443");
        let t = Target::new("ctl.example:7443", Some("ctl.example:8443"), "x");
        assert_eq!(t.tcp, "ctl.example:8443");
    }

    #[test]
    fn no_proxy_exempts_names_suffixes_ips_and_ranges() {
        let env = ProxyEnv {
            https: Some(Proxy::parse("http://proxy.corp:3128").unwrap()),
            no_proxy: ["internal.example", ".svc", "192.0.2.9", "198.51.100.0/24"]
                .map(String::from)
                .to_vec(),
        };
        assert!(env.for_host("ctl.public.example").is_some());
        assert!(env.for_host("internal.example").is_none());
        assert!(env.for_host("a.internal.example").is_none());
        assert!(env.for_host("api.default.svc").is_none());
        assert!(env.for_host("192.0.2.9").is_none());
        assert!(env.for_host("192.0.2.10").is_some());
        assert!(env.for_host("198.51.100.77").is_none());
        let all = ProxyEnv {
            no_proxy: vec!["*".into()],
            ..env.clone()
        };
        assert!(all.for_host("anything").is_none());
        let none = ProxyEnv::default();
        assert!(none.for_host("x").is_none());
    }
}
