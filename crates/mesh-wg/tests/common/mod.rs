//! What both test files use: keys from a seed, and IP packets boringtun accepts.

use mesh_wg::LocalKeys;
use x25519_dalek::{PublicKey, StaticSecret};

/// A key pair made from one repeated byte.
pub fn keys(seed: u8) -> (StaticSecret, PublicKey) {
    let s = StaticSecret::from([seed; 32]);
    let p = PublicKey::from(&s);
    (s, p)
}

/// `secret` with what the handshake derives from it.
#[allow(dead_code)] // (not every test file uses it)
pub fn local(secret: &StaticSecret) -> LocalKeys {
    LocalKeys::new(secret.clone())
}

/// An IPv4/UDP packet of `len` bytes from 100.64.0.1 to 100.64.0.2 (boringtun checks the
/// header of what it decrypts).
pub fn packet(len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}
