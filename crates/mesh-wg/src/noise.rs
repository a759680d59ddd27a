//! The primitives of WireGuard's Noise_IKpsk2 handshake (section 5.4 of the WireGuard paper):
//! BLAKE2s hashing, keyed BLAKE2s for the macs, HMAC-BLAKE2s key derivation, ChaCha20-Poly1305
//! with a zero nonce for the handshake's encrypted fields.

use crate::Error;
use blake2::digest::{FixedOutput, KeyInit, Mac as _, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::ChaCha20Poly1305;
use hmac::SimpleHmac;
use x25519_dalek::{PublicKey, StaticSecret};

pub(crate) const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
pub(crate) const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
pub(crate) const LABEL_MAC1: &[u8] = b"mac1----";
pub(crate) const LABEL_COOKIE: &[u8] = b"cookie--";

/// BLAKE2s-256 of the concatenation of `parts`.
pub(crate) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// Keyed BLAKE2s with a 16-byte output (the macs and the cookie).
pub(crate) fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    // A key of 1 to 32 bytes is always accepted; every key here is 16 or 32 bytes.
    let mut m = match <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 16],
    };
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

/// HMAC-BLAKE2s-256 of the concatenation of `parts`.
fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut m = match <SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// The paper's KDF_n: `N` 32-byte outputs derived from `key` and `input`.
pub(crate) fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [[u8; 32]; N] {
    let prk = hmac(key, &[input]);
    let mut out = [[0u8; 32]; N];
    let mut prev: Option<[u8; 32]> = None;
    for (i, o) in out.iter_mut().enumerate() {
        let counter = [i as u8 + 1];
        *o = match &prev {
            None => hmac(&prk, &[&counter]),
            Some(p) => hmac(&prk, &[p, &counter]),
        };
        prev = Some(*o);
    }
    out
}

/// X25519, refusing an all-zero result (the peer sent a low-order point).
pub(crate) fn dh(secret: &StaticSecret, public: &PublicKey) -> Result<[u8; 32], Error> {
    let shared = secret.diffie_hellman(public).to_bytes();
    if shared == [0u8; 32] {
        return Err(Error::WeakKey);
    }
    Ok(shared)
}

/// Seals `buf[..len]` in place with a zero nonce and `aad`, writing the tag at `buf[len..len+16]`.
pub(crate) fn seal(key: &[u8; 32], aad: &[u8], buf: &mut [u8], len: usize) {
    let cipher = ChaCha20Poly1305::new(key.into());
    let (data, rest) = buf.split_at_mut(len);
    // Encryption fails only for messages beyond ChaCha20's 256 GiB: never here.
    if let Ok(tag) = cipher.encrypt_in_place_detached(&[0u8; 12].into(), aad, data) {
        rest[..16].copy_from_slice(&tag);
    }
}

/// Opens `buf` (ciphertext and its 16-byte tag) in place; the plaintext is `buf[..len - 16]`.
pub(crate) fn open(key: &[u8; 32], aad: &[u8], buf: &mut [u8]) -> Result<(), Error> {
    let len = buf.len().checked_sub(16).ok_or(Error::Malformed)?;
    let cipher = ChaCha20Poly1305::new(key.into());
    let (data, tag) = buf.split_at_mut(len);
    cipher
        .decrypt_in_place_detached(&[0u8; 12].into(), aad, data, (&*tag).into())
        .map_err(|_| Error::Decrypt)
}

/// The running state of one side of a handshake: chaining key and hash.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) ck: [u8; 32],
    pub(crate) h: [u8; 32],
}

impl State {
    /// The state both sides start from, given the responder's static public key.
    pub(crate) fn start(responder: &PublicKey) -> State {
        let ck = hash(&[CONSTRUCTION]);
        let h = hash(&[&ck, IDENTIFIER]);
        State {
            h: hash(&[&h, responder.as_bytes()]),
            ck,
        }
    }

    /// Mixes `data` into the hash.
    pub(crate) fn mix_hash(&mut self, data: &[u8]) {
        self.h = hash(&[&self.h, data]);
    }

    /// Mixes `input` into the chaining key.
    pub(crate) fn mix_key(&mut self, input: &[u8]) {
        let [ck] = kdf::<1>(&self.ck, input);
        self.ck = ck;
    }

    /// Mixes a DH result into the chaining key and returns the key for the next field.
    pub(crate) fn mix_dh(&mut self, shared: &[u8; 32]) -> [u8; 32] {
        let [ck, key] = kdf::<2>(&self.ck, shared);
        self.ck = ck;
        key
    }

    /// Encrypts `buf[..len]` in place (tag after it) with `key` and the hash as associated data,
    /// and mixes the ciphertext into the hash.
    pub(crate) fn encrypt(&mut self, key: &[u8; 32], buf: &mut [u8], len: usize) {
        seal(key, &self.h, buf, len);
        self.mix_hash(&buf[..len + 16]);
    }

    /// Decrypts `field` (ciphertext and tag) into `out` with `key` and the hash as associated
    /// data, and mixes the ciphertext into the hash.
    pub(crate) fn decrypt(
        &mut self,
        key: &[u8; 32],
        field: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        if out.len() != field.len() {
            return Err(Error::Malformed);
        }
        out.copy_from_slice(field);
        open(key, &self.h, out)?;
        self.mix_hash(field);
        Ok(())
    }
}

/// The key mac1 of a message to `receiver` is made with.
pub(crate) fn mac1_key(receiver: &PublicKey) -> [u8; 32] {
    hash(&[LABEL_MAC1, receiver.as_bytes()])
}

/// The key cookie replies from `sender` are encrypted with.
pub(crate) fn cookie_key(sender: &PublicKey) -> [u8; 32] {
    hash(&[LABEL_COOKIE, sender.as_bytes()])
}
