//! x25519 public keys as they appear in messages, tokens and CLI output.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A 32-byte x25519 public key (a node's or the controller's identity).
///
/// Its text form is standard base64 (44 characters), the same form `wg` uses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The first 8 characters of the base64 form, for tables and logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }

    /// A short digest of the key for people to compare, as `mesh status` shows it on the node
    /// and `mesh-controller node pending` on the controller: the first 8 bytes of its SHA-256,
    /// in four groups of hex (`3f2a-91c0-77de-0b14`). Guessing a key with a given
    /// fingerprint takes about 2^64 tries.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.0);
        let hex = crate::hex::encode(&digest[..8]);
        format!(
            "{}-{}-{}-{}",
            &hex[..4],
            &hex[4..8],
            &hex[8..12],
            &hex[12..16]
        )
    }
}

/// The key text was not 32 bytes of base64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid public key {0:?}: expected 44 characters of base64 (32 bytes)")]
pub struct InvalidKey(pub String);

impl FromStr for PublicKey {
    type Err = InvalidKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|_| InvalidKey(s.to_owned()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| InvalidKey(s.to_owned()))?;
        Ok(PublicKey(arr))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let k = PublicKey([7u8; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<PublicKey>(), Ok(k));
    }

    #[test]
    fn fingerprints_are_short_and_differ() {
        let a = PublicKey([7u8; 32]).fingerprint();
        assert_eq!(a.len(), 19);
        assert_eq!(a.matches('-').count(), 3);
        assert_ne!(a, PublicKey([8u8; 32]).fingerprint());
    }

    #[test]
    fn rejects_wrong_length() {
        assert!("AAAA".parse::<PublicKey>().is_err());
        assert!("not base64 at all!".parse::<PublicKey>().is_err());
    }
}
