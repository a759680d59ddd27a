//! The handshake: an initiation (148 bytes) answered by a response (92 bytes), after which both
//! sides hold a [`Transport`]. Field layout and derivation as in section 5.4 of the WireGuard
//! paper. mac2 is zero unless a cookie was given ([`add_mac2`]); a responder under load answers
//! with a cookie reply instead ([`cookie_reply`]), which the initiator opens
//! ([`Initiated::receive_cookie_reply`]) to prove its address on the next try.
//!
//! A refused message changes nothing: [`Initiated`] stays usable for the right response, and
//! nothing is kept of an initiation that fails to decrypt.

use crate::noise::{self, State};
use crate::transport::Transport;
use crate::{
    Error, COOKIE_REPLY_LEN, INITIATION_LEN, RESPONSE_LEN, TYPE_COOKIE_REPLY, TYPE_INITIATION,
    TYPE_RESPONSE,
};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use x25519_dalek::{PublicKey, StaticSecret};

/// This side's static key with what WireGuard derives from it, computed once instead of for
/// every handshake message: the public key (an X25519 base-point multiplication), the key that
/// checks mac1 of messages sent to it, and the handshake state an initiation to it starts from.
#[derive(Clone)]
pub struct LocalKeys {
    secret: StaticSecret,
    public: PublicKey,
    mac1: [u8; 32],
    start: State,
}

impl LocalKeys {
    pub fn new(secret: StaticSecret) -> LocalKeys {
        let public = PublicKey::from(&secret);
        LocalKeys {
            mac1: noise::mac1_key(&public),
            start: State::start(&public),
            secret,
            public,
        }
    }

    /// The public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Whether `message`'s mac1 was made for this side ([`mac1_ok`], without deriving the key).
    pub fn mac1_ok(&self, message: &[u8]) -> bool {
        mac1_keyed(&self.mac1, message)
    }
}

impl From<StaticSecret> for LocalKeys {
    fn from(secret: StaticSecret) -> LocalKeys {
        LocalKeys::new(secret)
    }
}

/// The initiator's side between sending an initiation and receiving its response.
pub struct Initiated {
    state: State,
    ephemeral: StaticSecret,
    peer: PublicKey,
    /// The index this side chose; the response and the peer's data messages carry it.
    pub local_index: u32,
    /// The timestamp the initiation carried.
    pub timestamp: [u8; 12],
    /// The initiation's mac1: a cookie reply to it is encrypted against it.
    mac1: [u8; 16],
}

/// A verified initiation, before it is answered.
pub struct Received {
    state: State,
    ephemeral: PublicKey,
    /// The initiator's static public key (proved by the initiation).
    pub peer: PublicKey,
    /// The index the initiator chose: our messages to it carry it.
    pub remote_index: u32,
    /// The initiation's TAI64N timestamp. The responder accepts an initiation from one peer only
    /// if this is later than the last one it accepted (replay protection).
    pub timestamp: [u8; 12],
}

fn reserved_ok(m: &[u8]) -> bool {
    m[1..4] == [0, 0, 0]
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn key32(b: &[u8]) -> PublicKey {
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[..32]);
    PublicKey::from(k)
}

/// Compares two macs without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes an initiation to `peer` into `out` (at least [`INITIATION_LEN`] bytes).
/// `ephemeral` is this handshake's fresh random secret; `timestamp` is [`crate::tai64n`] of now.
pub fn initiate(
    local: &LocalKeys,
    peer: &PublicKey,
    local_index: u32,
    ephemeral: [u8; 32],
    timestamp: [u8; 12],
    out: &mut [u8],
) -> Result<Initiated, Error> {
    let out = out.get_mut(..INITIATION_LEN).ok_or(Error::Buffer)?;
    let ephemeral = StaticSecret::from(ephemeral);
    let e_pub = PublicKey::from(&ephemeral);
    let mut st = State::start(peer);
    st.mix_key(e_pub.as_bytes());
    st.mix_hash(e_pub.as_bytes());
    let key = st.mix_dh(&noise::dh(&ephemeral, peer)?);
    out[40..72].copy_from_slice(local.public.as_bytes());
    st.encrypt(&key, &mut out[40..88], 32);
    let key = st.mix_dh(&noise::dh(&local.secret, peer)?);
    out[88..100].copy_from_slice(&timestamp);
    st.encrypt(&key, &mut out[88..116], 12);
    out[0] = TYPE_INITIATION;
    out[1..4].fill(0);
    out[4..8].copy_from_slice(&local_index.to_le_bytes());
    out[8..40].copy_from_slice(e_pub.as_bytes());
    let mac1 = noise::mac(&noise::mac1_key(peer), &out[..116]);
    out[116..132].copy_from_slice(&mac1);
    out[132..148].fill(0);
    Ok(Initiated {
        state: st,
        ephemeral,
        peer: *peer,
        local_index,
        timestamp,
        mac1,
    })
}

/// Writes mac2 of a finished initiation or response with `cookie` (from a cookie reply of the
/// peer, younger than two minutes): a responder under load takes only messages with it.
pub fn add_mac2(message: &mut [u8], cookie: &[u8; 16]) -> Result<(), Error> {
    let at = message.len().checked_sub(16).ok_or(Error::Buffer)?;
    let mac2 = noise::mac(cookie, &message[..at]);
    message[at..].copy_from_slice(&mac2);
    Ok(())
}

/// Whether `message`'s mac2 was made with `cookie` (what the responder under load gave this
/// sender's address).
pub fn mac2_ok(cookie: &[u8; 16], message: &[u8]) -> bool {
    let Some(at) = message.len().checked_sub(16) else {
        return false;
    };
    same(&noise::mac(cookie, &message[..at]), &message[at..])
}

/// The cookie a responder under load gives the sender at `address` (its IP address and port
/// as bytes): a mac of the address under `secret`, a random value the responder changes every
/// two minutes.
pub fn cookie(secret: &[u8; 32], address: &[u8]) -> [u8; 16] {
    noise::mac(secret, address)
}

/// Writes into `out` (at least [`COOKIE_REPLY_LEN`] bytes) the cookie reply of `local` (public
/// key) to `message` (an initiation or response whose mac1 was checked), carrying `cookie`
/// encrypted with a fresh random `nonce`.
pub fn cookie_reply(
    local: &PublicKey,
    message: &[u8],
    cookie: &[u8; 16],
    nonce: [u8; 24],
    out: &mut [u8],
) -> Result<(), Error> {
    let out = out.get_mut(..COOKIE_REPLY_LEN).ok_or(Error::Buffer)?;
    let sender = match message.first() {
        Some(&TYPE_INITIATION) if message.len() == INITIATION_LEN => &message[4..8],
        Some(&TYPE_RESPONSE) if message.len() == RESPONSE_LEN => &message[4..8],
        _ => return Err(Error::Malformed),
    };
    let mac1 = &message[message.len() - 32..message.len() - 16];
    out[0] = TYPE_COOKIE_REPLY;
    out[1..4].fill(0);
    out[4..8].copy_from_slice(sender);
    out[8..32].copy_from_slice(&nonce);
    out[32..48].copy_from_slice(cookie);
    let cipher = XChaCha20Poly1305::new(&noise::cookie_key(local).into());
    let (data, tag) = out[32..].split_at_mut(16);
    let t = cipher
        .encrypt_in_place_detached(&nonce.into(), mac1, data)
        .map_err(|_| Error::Buffer)?;
    tag.copy_from_slice(&t);
    Ok(())
}

/// Whether `message`'s mac1 (the 32 bytes before its end are mac1 and mac2) was made for
/// `receiver`: the cheap check done before any Diffie-Hellman.
pub fn mac1_ok(receiver: &PublicKey, message: &[u8]) -> bool {
    mac1_keyed(&noise::mac1_key(receiver), message)
}

fn mac1_keyed(key: &[u8; 32], message: &[u8]) -> bool {
    let Some(at) = message.len().checked_sub(32) else {
        return false;
    };
    same(&noise::mac(key, &message[..at]), &message[at..at + 16])
}

/// The static key of the initiator of `message`, an initiation sent to `local`: mac1, one
/// Diffie-Hellman and one decryption, before anything else is spent on it.
pub fn initiator_of(local: &LocalKeys, message: &[u8]) -> Result<PublicKey, Error> {
    open_initiation(local, message).map(|o| o.peer)
}

/// The first half of taking an initiation sent to `local`: its checks (mac1 first), one
/// Diffie-Hellman and the decryption of the initiator's static key. [`Opened::finish`] does
/// the rest, so a caller that had to know the initiator first (to find its session) does not
/// pay that Diffie-Hellman twice.
pub fn open_initiation(local: &LocalKeys, message: &[u8]) -> Result<Opened, Error> {
    if message.len() != INITIATION_LEN || message[0] != TYPE_INITIATION || !reserved_ok(message) {
        return Err(Error::Malformed);
    }
    if !local.mac1_ok(message) {
        return Err(Error::Mac1);
    }
    let ephemeral = key32(&message[8..40]);
    let mut state = local.start.clone();
    state.mix_key(ephemeral.as_bytes());
    state.mix_hash(ephemeral.as_bytes());
    let key = state.mix_dh(&noise::dh(&local.secret, &ephemeral)?);
    let mut peer = [0u8; 48];
    state.decrypt(&key, &message[40..88], &mut peer)?;
    Ok(Opened {
        state,
        ephemeral,
        peer: key32(&peer),
    })
}

/// An initiation whose sender is known ([`open_initiation`]), not yet verified.
pub struct Opened {
    state: State,
    ephemeral: PublicKey,
    peer: PublicKey,
}

impl Opened {
    /// The initiator's static key, as the initiation claims it (proved only by [`Opened::finish`]).
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// The second half: verifies and decrypts the rest of `message` (the initiation this was
    /// opened from; any other fails to decrypt).
    pub fn finish(self, local: &LocalKeys, message: &[u8]) -> Result<Received, Error> {
        if message.len() != INITIATION_LEN {
            return Err(Error::Malformed);
        }
        let Opened {
            mut state,
            ephemeral,
            peer,
        } = self;
        let key = state.mix_dh(&noise::dh(&local.secret, &peer)?);
        let mut ts = [0u8; 28];
        state.decrypt(&key, &message[88..116], &mut ts)?;
        let mut timestamp = [0u8; 12];
        timestamp.copy_from_slice(&ts[..12]);
        Ok(Received {
            state,
            ephemeral,
            peer,
            remote_index: le32(&message[4..8]),
            timestamp,
        })
    }
}

/// Verifies and decrypts an initiation sent to `local`.
pub fn receive_initiation(local: &LocalKeys, message: &[u8]) -> Result<Received, Error> {
    open_initiation(local, message)?.finish(local, message)
}

/// Answers a verified initiation: writes the response into `out` (at least [`RESPONSE_LEN`]
/// bytes) and returns the responder's session. `psk`: the pair's preshared key (zeros for none).
pub fn respond(
    received: Received,
    psk: &[u8; 32],
    local_index: u32,
    ephemeral: [u8; 32],
    out: &mut [u8],
) -> Result<Transport, Error> {
    let out = out.get_mut(..RESPONSE_LEN).ok_or(Error::Buffer)?;
    let Received {
        state: mut st,
        ephemeral: their_e,
        peer,
        remote_index,
        ..
    } = received;
    let ephemeral = StaticSecret::from(ephemeral);
    let e_pub = PublicKey::from(&ephemeral);
    st.mix_key(e_pub.as_bytes());
    st.mix_hash(e_pub.as_bytes());
    st.mix_key(&noise::dh(&ephemeral, &their_e)?);
    st.mix_key(&noise::dh(&ephemeral, &peer)?);
    let [ck, tau, key] = noise::kdf::<3>(&st.ck, psk);
    st.ck = ck;
    st.mix_hash(&tau);
    st.encrypt(&key, &mut out[44..60], 0);
    out[0] = TYPE_RESPONSE;
    out[1..4].fill(0);
    out[4..8].copy_from_slice(&local_index.to_le_bytes());
    out[8..12].copy_from_slice(&remote_index.to_le_bytes());
    out[12..44].copy_from_slice(e_pub.as_bytes());
    let mac1 = noise::mac(&noise::mac1_key(&peer), &out[..60]);
    out[60..76].copy_from_slice(&mac1);
    out[76..92].fill(0);
    let [to_responder, to_initiator] = noise::kdf::<2>(&st.ck, &[]);
    Ok(Transport::new(
        local_index,
        remote_index,
        &to_initiator,
        &to_responder,
    ))
}

impl Initiated {
    /// The peer this initiation went to.
    pub fn peer(&self) -> &PublicKey {
        &self.peer
    }

    /// Opens the peer's cookie reply to this initiation: the cookie to put in mac2
    /// ([`add_mac2`]) of the next initiation, for two minutes.
    pub fn receive_cookie_reply(&self, message: &[u8]) -> Result<[u8; 16], Error> {
        if message.len() != COOKIE_REPLY_LEN
            || message[0] != TYPE_COOKIE_REPLY
            || !reserved_ok(message)
        {
            return Err(Error::Malformed);
        }
        if le32(&message[4..8]) != self.local_index {
            return Err(Error::WrongIndex);
        }
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&message[8..32]);
        let mut cookie = [0u8; 16];
        cookie.copy_from_slice(&message[32..48]);
        let cipher = XChaCha20Poly1305::new(&noise::cookie_key(&self.peer).into());
        cipher
            .decrypt_in_place_detached(
                &nonce.into(),
                &self.mac1,
                &mut cookie,
                message[48..64].into(),
            )
            .map_err(|_| Error::Decrypt)?;
        Ok(cookie)
    }

    /// Completes the handshake with the peer's response. A refused response leaves `self`
    /// as it was, ready for the right one.
    pub fn receive_response(
        &self,
        local: &LocalKeys,
        psk: &[u8; 32],
        message: &[u8],
    ) -> Result<Transport, Error> {
        if message.len() != RESPONSE_LEN || message[0] != TYPE_RESPONSE || !reserved_ok(message) {
            return Err(Error::Malformed);
        }
        if le32(&message[8..12]) != self.local_index {
            return Err(Error::WrongIndex);
        }
        if !local.mac1_ok(message) {
            return Err(Error::Mac1);
        }
        let mut st = self.state.clone();
        let their_e = key32(&message[12..44]);
        st.mix_key(their_e.as_bytes());
        st.mix_hash(their_e.as_bytes());
        st.mix_key(&noise::dh(&self.ephemeral, &their_e)?);
        st.mix_key(&noise::dh(&local.secret, &their_e)?);
        let [ck, tau, key] = noise::kdf::<3>(&st.ck, psk);
        st.ck = ck;
        st.mix_hash(&tau);
        let mut empty = [0u8; 16];
        st.decrypt(&key, &message[44..60], &mut empty)?;
        let [to_responder, to_initiator] = noise::kdf::<2>(&st.ck, &[]);
        let remote_index = le32(&message[4..8]);
        Ok(Transport::new(
            self.local_index,
            remote_index,
            &to_responder,
            &to_initiator,
        ))
    }
}
