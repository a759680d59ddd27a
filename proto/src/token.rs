//! The join token: one copy-pasteable string that tells a node where the controller is, which
//! key the controller must prove, and the secret that admits the node to a network.
//!
//! Text form: `mesh1_` followed by unpadded base64url of
//! `[version][addr_len u8][addr utf-8 "host:port"][controller key 32][id_len u8][id][secret 32]`
//! and, from version 2 on, extensions `[tag u8][len u8][value]` up to the end:
//! - tag 1: the controller's TCP address (`host:port`, TLS after an HTTP upgrade), for nodes
//!   whose UDP is blocked.
//!
//! Unknown tags are skipped, so later extensions do not need a new version. A token without
//! extensions is written as version 1, which every agent reads; an agent that meets a version
//! newer than it knows says that the token comes from a newer controller.

use crate::PublicKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "mesh1_";
/// The newest version this code reads and writes.
pub const FORMAT_VERSION: u8 = 2;
const TAG_TCP: u8 = 1;
/// Longest token text accepted.
pub const MAX_TOKEN_LEN: usize = 512;

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
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("controller", &self.controller)
            .field("controller_key", &self.controller_key)
            .field("id", &self.id)
            .field("controller_tcp", &self.controller_tcp)
            .finish_non_exhaustive()
    }
}

/// Why a token string was refused.
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
}

impl JoinToken {
    /// The secret as lowercase hex, as sent in `ClientMsg::Join`.
    pub fn secret_hex(&self) -> String {
        crate::hex::encode(&self.secret)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Vec::with_capacity(160);
        b.push(if self.controller_tcp.is_some() { 2 } else { 1 });
        b.push(self.controller.len() as u8);
        b.extend_from_slice(self.controller.as_bytes());
        b.extend_from_slice(&self.controller_key.0);
        b.push(self.id.len() as u8);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(&self.secret);
        if let Some(tcp) = &self.controller_tcp {
            b.push(TAG_TCP);
            b.push(tcp.len() as u8);
            b.extend_from_slice(tcp.as_bytes());
        }
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Damaged("too short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }
    fn array32(&mut self) -> Result<[u8; 32], TokenError> {
        let s = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        Ok(a)
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Damaged("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged("not base64url"))?;
        let mut r = Reader(&bytes);
        let version = r.byte()?;
        match version {
            1 | 2 => {}
            0 => return Err(TokenError::Damaged("unknown token version")),
            v => return Err(TokenError::Newer(v)),
        }
        let n = r.byte()? as usize;
        let controller = std::str::from_utf8(r.take(n)?)
            .map_err(|_| TokenError::Damaged("bad controller address"))?
            .to_owned();
        let controller_key = PublicKey(r.array32()?);
        let n = r.byte()? as usize;
        let id = std::str::from_utf8(r.take(n)?)
            .map_err(|_| TokenError::Damaged("bad token id"))?
            .to_owned();
        let secret = r.array32()?;
        let mut controller_tcp = None;
        if version == 1 && !r.0.is_empty() {
            return Err(TokenError::Damaged("trailing bytes"));
        }
        while !r.0.is_empty() {
            let tag = r.byte()?;
            let n = r.byte()? as usize;
            let value = r.take(n)?;
            if tag == TAG_TCP {
                let addr = std::str::from_utf8(value)
                    .map_err(|_| TokenError::Damaged("bad TCP address"))?;
                if addr.is_empty() {
                    return Err(TokenError::Damaged("empty field"));
                }
                controller_tcp = Some(addr.to_owned());
            }
        }
        if controller.is_empty() || id.is_empty() {
            return Err(TokenError::Damaged("empty field"));
        }
        Ok(JoinToken {
            controller,
            controller_key,
            id,
            secret,
            controller_tcp,
        })
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
    fn a_tcp_address_makes_a_version_2_token_that_stays_one_line() {
        let t = JoinToken {
            controller_tcp: Some("192.0.2.1:443".into()),
            ..sample()
        };
        let s = t.to_string();
        assert!(s.starts_with("mesh1_") && !s.contains(char::is_whitespace));
        assert!(s.len() < 200, "{} characters", s.len());
        assert_eq!(s.parse::<JoinToken>(), Ok(t));
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
    }

    #[test]
    fn refuses_damage() {
        let s = sample().to_string();
        assert_eq!("hello".parse::<JoinToken>(), Err(TokenError::Prefix));
        assert!(s[..s.len() - 4].parse::<JoinToken>().is_err());
        assert!(format!("{s}AA").parse::<JoinToken>().is_err());
        assert!("mesh1_!!!".parse::<JoinToken>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "mesh1_[A-Za-z0-9_-]{0,200}") {
            let _ = s.parse::<JoinToken>();
        }
    }
}
