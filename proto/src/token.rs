//! What `mesh join` takes: a join token (a pre-approved join, for automation) or a network id
//! (a request the administrator approves). Both are one copy-pasteable line that tells a node
//! where the controller is and which key the controller must prove; only the token holds a
//! secret.
//!
//! Text forms, each a prefix and unpadded base64url of a byte layout:
//! - token, `mesh1_`:
//!   `[version][addr_len u8][addr "host:port"][controller key 32][id_len u8][id][secret 32]`;
//! - network id, `meshnet1_`:
//!   `[version][addr_len u8][addr "host:port"][controller key 32][net_len u8][network name]`.
//!
//! Both continue with the same extensions, `[tag u8][len u8][value]` up to the end (tokens from
//! version 2 on; network ids always):
//! - tag 1: the controller's TCP address (`host:port`, TLS after an HTTP upgrade), for nodes
//!   whose UDP is blocked;
//! - tag 2 (repeated, at most [`MAX_OTHER_CONTROLLERS`]): another QUIC address of the same
//!   controller, tried when the first does not answer.
//!
//! Unknown tags are skipped, so later extensions do not need a new version. A token without
//! extensions is written as version 1, which every agent reads; an agent that meets a version
//! newer than it knows says that the text comes from a newer controller.

use crate::PublicKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "mesh1_";
/// The prefix of a network id.
pub const NETWORK_PREFIX: &str = "meshnet1_";
/// The newest token version this code reads and writes.
pub const FORMAT_VERSION: u8 = 2;
/// The newest network id version this code reads and writes.
pub const NETWORK_FORMAT_VERSION: u8 = 1;
const TAG_TCP: u8 = 1;
const TAG_CONTROLLER: u8 = 2;
/// Longest token or network id text accepted.
pub const MAX_TOKEN_LEN: usize = 512;
/// Most extra controller addresses a token or network id carries.
pub const MAX_OTHER_CONTROLLERS: usize = 4;

/// Where the controller is and what it must prove: the part tokens and network ids share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRef {
    /// Controller address, `host:port` (QUIC over UDP).
    pub addr: String,
    /// The controller's x25519 key, pinned: the node refuses a controller that cannot prove it.
    pub key: PublicKey,
    /// The controller's TCP address, `host:port`, when it listens on TCP.
    pub tcp: Option<String>,
    /// Other QUIC addresses of the same controller, tried in turn after `addr`.
    pub others: Vec<String>,
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Controller address, `host:port`.
    pub controller: String,
    /// The controller's x25519 key, pinned: the node refuses a controller that cannot prove it.
    pub controller_key: PublicKey,
    /// Token identifier, as listed by `mesh-controller token list`.
    pub id: String,
    /// The secret; the controller stores only its hash.
    pub secret: [u8; 32],
    /// The controller's TCP address, `host:port`, when it listens on TCP (version 2 tokens).
    pub controller_tcp: Option<String>,
    /// Other QUIC addresses of the same controller (another address family, another
    /// replica), tried in turn after `controller` (version 2 tokens).
    pub controller_others: Vec<String>,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("controller", &self.controller)
            .field("controller_key", &self.controller_key)
            .field("id", &self.id)
            .field("controller_tcp", &self.controller_tcp)
            .field("controller_others", &self.controller_others)
            .finish_non_exhaustive()
    }
}

/// A decoded network id: which controller, which network, and nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkId {
    /// The controller.
    pub controller: ControllerRef,
    /// The network's name on that controller.
    pub network: String,
}

/// Why a token or network id string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Does not start with `mesh1_`.
    #[error("not a mesh join token (it should start with \"mesh1_\"); copy the whole line printed by `mesh-controller token create`")]
    Prefix,
    /// Base64 or layout is broken.
    #[error("join token is damaged ({0}); copy the whole line printed by `mesh-controller token create`")]
    Damaged(&'static str),
    /// Made by a newer controller than this agent understands.
    #[error("this join token was made by a newer mesh-controller (token format {0}, this mesh reads up to {FORMAT_VERSION}); upgrade mesh on this node")]
    Newer(u8),
    /// A network id whose base64 or layout is broken.
    #[error("network id is damaged ({0}); copy the whole line printed by `mesh-controller network id NETWORK`")]
    NetworkDamaged(&'static str),
    /// A network id made by a newer controller.
    #[error("this network id was made by a newer mesh-controller (format {0}, this mesh reads up to {NETWORK_FORMAT_VERSION}); upgrade mesh on this node")]
    NetworkNewer(u8),
}

impl JoinToken {
    /// The secret as lowercase hex, as sent in `ClientMsg::Join`.
    pub fn secret_hex(&self) -> String {
        crate::hex::encode(&self.secret)
    }
}

/// Appends `[len u8][bytes]`.
fn push_field(b: &mut Vec<u8>, s: &str) {
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

/// Appends the extensions of `tcp` and `others`.
fn push_extensions(b: &mut Vec<u8>, tcp: Option<&str>, others: &[String]) {
    if let Some(tcp) = tcp {
        b.push(TAG_TCP);
        push_field(b, tcp);
    }
    for other in others.iter().take(MAX_OTHER_CONTROLLERS) {
        b.push(TAG_CONTROLLER);
        push_field(b, other);
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Vec::with_capacity(160);
        let extended = self.controller_tcp.is_some() || !self.controller_others.is_empty();
        b.push(if extended { 2 } else { 1 });
        push_field(&mut b, &self.controller);
        b.extend_from_slice(&self.controller_key.0);
        push_field(&mut b, &self.id);
        b.extend_from_slice(&self.secret);
        push_extensions(
            &mut b,
            self.controller_tcp.as_deref(),
            &self.controller_others,
        );
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Vec::with_capacity(160);
        b.push(NETWORK_FORMAT_VERSION);
        push_field(&mut b, &self.controller.addr);
        b.extend_from_slice(&self.controller.key.0);
        push_field(&mut b, &self.network);
        push_extensions(
            &mut b,
            self.controller.tcp.as_deref(),
            &self.controller.others,
        );
        write!(f, "{NETWORK_PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }
}

/// Reads the byte layouts; every failure is a short reason for the `Damaged` errors.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("too short");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn array32(&mut self) -> Result<[u8; 32], &'static str> {
        let s = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// `[len u8][utf-8]`, not empty.
    fn text(&mut self, what: &'static str) -> Result<String, &'static str> {
        let n = self.byte()? as usize;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| what)?;
        if s.is_empty() {
            return Err("empty field");
        }
        Ok(s.to_owned())
    }
    /// The extensions up to the end: (TCP address, other controller addresses).
    fn extensions(&mut self) -> Result<(Option<String>, Vec<String>), &'static str> {
        let mut tcp = None;
        let mut others = Vec::new();
        while !self.0.is_empty() {
            let tag = self.byte()?;
            match tag {
                TAG_TCP => tcp = Some(self.text("bad TCP address")?),
                TAG_CONTROLLER => {
                    let addr = self.text("bad controller address")?;
                    if others.len() == MAX_OTHER_CONTROLLERS {
                        return Err("too many controller addresses");
                    }
                    others.push(addr);
                }
                _ => {
                    let n = self.byte()? as usize;
                    self.take(n)?;
                }
            }
        }
        Ok((tcp, others))
    }
}

/// The bytes after `prefix`, bounded and decoded.
fn body(s: &str, prefix: &str) -> Option<Result<Vec<u8>, &'static str>> {
    let body = s.strip_prefix(prefix)?;
    if s.len() > MAX_TOKEN_LEN {
        return Some(Err("too long"));
    }
    Some(URL_SAFE_NO_PAD.decode(body).map_err(|_| "not base64url"))
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = body(s.trim(), PREFIX)
            .ok_or(TokenError::Prefix)?
            .map_err(TokenError::Damaged)?;
        let mut r = Reader(&bytes);
        let version = r.byte().map_err(TokenError::Damaged)?;
        match version {
            1 | 2 => {}
            0 => return Err(TokenError::Damaged("unknown token version")),
            v => return Err(TokenError::Newer(v)),
        }
        let parse = |r: &mut Reader<'_>| {
            let controller = r.text("bad controller address")?;
            let controller_key = PublicKey(r.array32()?);
            let id = r.text("bad token id")?;
            let secret = r.array32()?;
            if version == 1 && !r.0.is_empty() {
                return Err("trailing bytes");
            }
            let (controller_tcp, controller_others) = r.extensions()?;
            Ok(JoinToken {
                controller,
                controller_key,
                id,
                secret,
                controller_tcp,
                controller_others,
            })
        };
        parse(&mut r).map_err(TokenError::Damaged)
    }
}

impl FromStr for NetworkId {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = body(s.trim(), NETWORK_PREFIX)
            .ok_or(TokenError::NetworkDamaged(
                "it should start with \"meshnet1_\"",
            ))?
            .map_err(TokenError::NetworkDamaged)?;
        let mut r = Reader(&bytes);
        match r.byte().map_err(TokenError::NetworkDamaged)? {
            NETWORK_FORMAT_VERSION => {}
            0 => return Err(TokenError::NetworkDamaged("unknown version")),
            v => return Err(TokenError::NetworkNewer(v)),
        }
        let parse = |r: &mut Reader<'_>| {
            let addr = r.text("bad controller address")?;
            let key = PublicKey(r.array32()?);
            let network = r.text("bad network name")?;
            if !crate::control::valid_name(&network) {
                return Err("bad network name");
            }
            let (tcp, others) = r.extensions()?;
            Ok(NetworkId {
                controller: ControllerRef {
                    addr,
                    key,
                    tcp,
                    others,
                },
                network,
            })
        };
        parse(&mut r).map_err(TokenError::NetworkDamaged)
    }
}

/// What `mesh join` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinArg {
    /// A join token: joins at once.
    Token(JoinToken),
    /// A network id: asks, and the administrator approves.
    Network(NetworkId),
}

/// Why `mesh join`'s argument was refused: which form it resembles and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinArgError {
    /// It looks like a token (`mesh1_`), but is not a good one.
    #[error("{0}")]
    Token(TokenError),
    /// It looks like a network id (`meshnet1_`), but is not a good one.
    #[error("{0}")]
    Network(TokenError),
    /// It looks like a bare network name.
    #[error("{0:?} looks like a network name; `mesh join` takes the network id, which names the controller too: on the controller run `mesh-controller network id {0}` and pass what it prints (or a join token from `mesh-controller token create {0}`)")]
    NetworkName(String),
    /// Neither form.
    #[error("neither a network id (meshnet1_..., from `mesh-controller network id NETWORK`) nor a join token (mesh1_..., from `mesh-controller token create NETWORK`); copy the whole line")]
    Neither,
}

impl FromStr for JoinArg {
    type Err = JoinArgError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.starts_with(NETWORK_PREFIX) {
            return t
                .parse()
                .map(JoinArg::Network)
                .map_err(JoinArgError::Network);
        }
        if t.starts_with(PREFIX) {
            return t.parse().map(JoinArg::Token).map_err(JoinArgError::Token);
        }
        // Near misses: a prefix with a typo or another case, or the other separator.
        let lower = t.to_ascii_lowercase();
        if lower.starts_with("meshnet") {
            return Err(JoinArgError::Network(TokenError::NetworkDamaged(
                "it should start with \"meshnet1_\"",
            )));
        }
        if lower.starts_with("mesh1") || lower.starts_with("mesh_") {
            return Err(JoinArgError::Token(TokenError::Prefix));
        }
        if crate::control::valid_name(t) && t.len() < 40 {
            return Err(JoinArgError::NetworkName(t.to_owned()));
        }
        Err(JoinArgError::Neither)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            controller: "192.0.2.1:7443".into(),
            controller_key: PublicKey([9; 32]),
            id: "a1b2c3d4".into(),
            secret: [5; 32],
            controller_tcp: None,
            controller_others: Vec::new(),
        }
    }

    fn network() -> NetworkId {
        NetworkId {
            controller: ControllerRef {
                addr: "192.0.2.1:7443".into(),
                key: PublicKey([9; 32]),
                tcp: Some("192.0.2.1:443".into()),
                others: vec!["198.51.100.7:7443".into()],
            },
            network: "prod".into(),
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.to_string();
        assert!(s.starts_with("mesh1_"));
        assert!(!s.contains(char::is_whitespace));
        assert_eq!(s.parse::<JoinToken>(), Ok(t));
    }

    #[test]
    fn a_network_id_round_trips_on_one_line_without_a_secret() {
        let n = network();
        let s = n.to_string();
        assert!(s.starts_with("meshnet1_") && !s.contains(char::is_whitespace));
        assert!(s.len() < 200, "{} characters", s.len());
        assert_eq!(s.parse::<NetworkId>(), Ok(n.clone()));
        assert_eq!(s.parse::<JoinArg>(), Ok(JoinArg::Network(n)));
        // The same layout as a token up to the network name, minus the secret: a network id
        // read as a token is refused, never taken for one.
        assert_eq!(s.parse::<JoinToken>(), Err(TokenError::Prefix));
    }

    #[test]
    fn join_arguments_say_which_form_they_resemble() {
        let token = sample().to_string();
        assert_eq!(token.parse::<JoinArg>(), Ok(JoinArg::Token(sample())));
        let id = network().to_string();
        let cut = &id[..id.len() - 6];
        let err = cut.parse::<JoinArg>().unwrap_err();
        assert!(matches!(err, JoinArgError::Network(_)), "{err:?}");
        assert!(err.to_string().contains("network id is damaged"), "{err}");
        let err = token[..token.len() - 6].parse::<JoinArg>().unwrap_err();
        assert!(err.to_string().contains("join token is damaged"), "{err}");
        let err = "prod".parse::<JoinArg>().unwrap_err();
        assert!(
            err.to_string().contains("mesh-controller network id prod"),
            "{err}"
        );
        let err = "MeshNet1-abc".parse::<JoinArg>().unwrap_err();
        assert!(err.to_string().contains("meshnet1_"), "{err}");
        let err = "https://example.com/x?y=1".parse::<JoinArg>().unwrap_err();
        assert_eq!(err, JoinArgError::Neither);
    }

    #[test]
    fn a_tcp_address_makes_a_version_2_token_that_stays_one_line() {
        let t = JoinToken {
            controller_tcp: Some("192.0.2.1:443".into()),
            controller_others: Vec::new(),
            ..sample()
        };
        let s = t.to_string();
        assert!(s.starts_with("mesh1_") && !s.contains(char::is_whitespace));
        assert!(s.len() < 200, "{} characters", s.len());
        assert_eq!(s.parse::<JoinToken>(), Ok(t));
        // Both families of one controller: the other address rides along.
        let both = JoinToken {
            controller_others: vec!["[2001:db8::1]:7443".into()],
            ..sample()
        };
        let s = both.to_string();
        assert!(s.len() < 200, "{} characters", s.len());
        assert_eq!(s.parse::<JoinToken>(), Ok(both));
        // Without one it stays version 1, which older agents read.
        let bytes = URL_SAFE_NO_PAD
            .decode(sample().to_string().strip_prefix(PREFIX).unwrap())
            .unwrap();
        assert_eq!(bytes[0], 1);
    }

    #[test]
    fn unknown_extensions_are_skipped_and_newer_versions_named() {
        let mut bytes = URL_SAFE_NO_PAD
            .decode(sample().to_string().strip_prefix(PREFIX).unwrap())
            .unwrap();
        bytes[0] = 2;
        bytes.extend_from_slice(&[77, 3, b'x', b'y', b'z']);
        let s = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(s.parse::<JoinToken>(), Ok(sample()));
        bytes[0] = 9;
        let s = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        let err = s.parse::<JoinToken>().unwrap_err();
        assert_eq!(err, TokenError::Newer(9));
        assert!(err.to_string().contains("upgrade mesh"), "{err}");
        let mut bytes = URL_SAFE_NO_PAD
            .decode(network().to_string().strip_prefix(NETWORK_PREFIX).unwrap())
            .unwrap();
        bytes.extend_from_slice(&[77, 1, b'x']);
        let s = format!("{NETWORK_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(s.parse::<NetworkId>(), Ok(network()));
        bytes[0] = 3;
        let s = format!("{NETWORK_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(s.parse::<NetworkId>(), Err(TokenError::NetworkNewer(3)));
    }

    #[test]
    fn refuses_damage() {
        let s = sample().to_string();
        assert_eq!("hello".parse::<JoinToken>(), Err(TokenError::Prefix));
        assert!(s[..s.len() - 4].parse::<JoinToken>().is_err());
        assert!(format!("{s}AA").parse::<JoinToken>().is_err());
        assert!("mesh1_!!!".parse::<JoinToken>().is_err());
        let mut bytes = URL_SAFE_NO_PAD
            .decode(network().to_string().strip_prefix(NETWORK_PREFIX).unwrap())
            .unwrap();
        for _ in 0..MAX_OTHER_CONTROLLERS {
            bytes.extend_from_slice(&[TAG_CONTROLLER, 3, b'a', b':', b'1']);
        }
        let s = format!("{NETWORK_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(
            s.parse::<NetworkId>(),
            Err(TokenError::NetworkDamaged("too many controller addresses"))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "(mesh1_|meshnet1_)?[A-Za-z0-9_-]{0,200}") {
            let _ = s.parse::<JoinToken>();
            let _ = s.parse::<NetworkId>();
            let _ = s.parse::<JoinArg>();
        }
    }
}
