//! The join token: one copy-pasteable string that tells a node where the controller is, which
//! key the controller must prove, and the secret that admits the node to a network.
//!
//! Text form: `mesh1_` followed by unpadded base64url of
//! `[version=1][addr_len u8][addr utf-8 "host:port"][controller key 32][id_len u8][id][secret 32]`.

use crate::PublicKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "mesh1_";
const FORMAT_VERSION: u8 = 1;
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
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("controller", &self.controller)
            .field("controller_key", &self.controller_key)
            .field("id", &self.id)
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
}

impl JoinToken {
    /// The secret as lowercase hex, as sent in `ClientMsg::Join`.
    pub fn secret_hex(&self) -> String {
        crate::hex::encode(&self.secret)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Vec::with_capacity(128);
        b.push(FORMAT_VERSION);
        b.push(self.controller.len() as u8);
        b.extend_from_slice(self.controller.as_bytes());
        b.extend_from_slice(&self.controller_key.0);
        b.push(self.id.len() as u8);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(&self.secret);
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
        if r.byte()? != FORMAT_VERSION {
            return Err(TokenError::Damaged("unknown token version"));
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
        if !r.0.is_empty() {
            return Err(TokenError::Damaged("trailing bytes"));
        }
        if controller.is_empty() || id.is_empty() {
            return Err(TokenError::Damaged("empty field"));
        }
        Ok(JoinToken {
            controller,
            controller_key,
            id,
            secret,
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
