//! mesh-wg against boringtun: each side of the handshake and data both ways, with mesh-wg as
//! initiator and as responder; then what must be refused.

mod common;
use common::{keys, local, packet};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use mesh_wg::handshake::{
    add_mac2, cookie, cookie_reply, initiate, mac2_ok, open_initiation, receive_initiation, respond,
};
use mesh_wg::{
    tai64n, Error, COOKIE_REPLY_LEN, DATA_HEADER_LEN, DATA_OVERHEAD, INITIATION_LEN, RESPONSE_LEN,
};
use proptest::prelude::*;
use x25519_dalek::StaticSecret;

const NO_PSK: [u8; 32] = [0; 32];

fn now() -> [u8; 12] {
    tai64n(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// Seals `p` with `t` the way a node would: the packet already behind room for the header.
fn seal(t: &mesh_wg::Transport, p: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; p.len() + DATA_OVERHEAD];
    buf[DATA_HEADER_LEN..DATA_HEADER_LEN + p.len()].copy_from_slice(p);
    let n = t.seal(&mut buf, p.len()).expect("seal");
    assert_eq!(n, p.len() + DATA_OVERHEAD);
    buf
}

fn network(r: TunnResult<'_>) -> Vec<u8> {
    match r {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        other => panic!("boringtun did not answer with a message: {other:?}"),
    }
}

fn tunnel(r: TunnResult<'_>) -> Vec<u8> {
    match r {
        TunnResult::WriteToTunnelV4(p, _) => p.to_vec(),
        other => panic!("boringtun did not give a packet: {other:?}"),
    }
}

/// mesh-wg initiates, boringtun answers; returns both sides, the first data message of ours
/// already delivered (a responder sends nothing before it has heard data).
fn mesh_initiates() -> (mesh_wg::Transport, Tunn, StaticSecret) {
    let (ours, our_pub) = keys(1);
    let (theirs, their_pub) = keys(2);
    let mut bt = Tunn::new(theirs, our_pub, None, None, 5, None);
    let mut init = [0u8; INITIATION_LEN];
    let initiated = initiate(
        &local(&ours),
        &their_pub,
        0x00ab_cdef,
        [7; 32],
        now(),
        &mut init,
    )
    .expect("initiate");
    let mut dst = vec![0u8; 10_000];
    let response = network(bt.decapsulate(None, &init, &mut dst));
    assert_eq!(response.len(), RESPONSE_LEN);
    let mut t = initiated
        .receive_response(&local(&ours), &NO_PSK, &response)
        .expect("boringtun's response");
    assert_eq!(t.local_index(), 0x00ab_cdef);
    let p = packet(1400, 0x5a);
    let sealed = seal(&t, &p);
    assert_eq!(tunnel(bt.decapsulate(None, &sealed, &mut dst)), p);
    // And back.
    let q = packet(600, 0x11);
    let mut m = network(bt.encapsulate(&q, &mut dst));
    assert_eq!(t.open(&mut m).expect("open boringtun's data"), &q[..]);
    (t, bt, ours)
}

#[test]
fn mesh_wg_initiates_and_boringtun_answers() {
    let (mut t, mut bt, _) = mesh_initiates();
    let mut dst = vec![0u8; 10_000];
    for len in [20, 21, 64, 1279, 1280, 1420, 8972] {
        let p = packet(len, len as u8);
        assert_eq!(
            tunnel(bt.decapsulate(None, &seal(&t, &p), &mut dst)),
            p,
            "{len} bytes to boringtun"
        );
        let mut m = network(bt.encapsulate(&p, &mut dst));
        assert_eq!(
            t.open(&mut m).expect("open"),
            &p[..],
            "{len} bytes from boringtun"
        );
    }
    // A keepalive of ours is an empty message boringtun takes.
    let keepalive = seal(&t, &[]);
    assert!(matches!(
        bt.decapsulate(None, &keepalive, &mut dst),
        TunnResult::Done
    ));
}

#[test]
fn boringtun_initiates_and_mesh_wg_answers() {
    let (ours, our_pub) = keys(3);
    let (theirs, their_pub) = keys(4);
    let mut bt = Tunn::new(theirs, our_pub, None, None, 9, None);
    let mut dst = vec![0u8; 10_000];
    let init = network(bt.format_handshake_initiation(&mut dst, false));
    let received = receive_initiation(&local(&ours), &init).expect("boringtun's initiation");
    assert_eq!(received.peer, their_pub);
    let mut response = [0u8; RESPONSE_LEN];
    let mut t = respond(received, &NO_PSK, 0x0000_0042, [9; 32], &mut response).expect("respond");
    // boringtun confirms the session with a keepalive.
    let mut keepalive = network(bt.decapsulate(None, &response, &mut dst));
    assert!(t
        .open(&mut keepalive)
        .expect("open the keepalive")
        .is_empty());
    for len in [20, 1420] {
        let p = packet(len, 0xc3);
        let mut m = network(bt.encapsulate(&p, &mut dst));
        assert_eq!(t.open(&mut m).expect("open"), &p[..]);
        assert_eq!(tunnel(bt.decapsulate(None, &seal(&t, &p), &mut dst)), p);
    }
}

#[test]
fn what_must_be_refused_is_refused_and_changes_nothing() {
    let (mut t, mut bt, ours) = mesh_initiates();
    let mut dst = vec![0u8; 10_000];
    let p = packet(100, 1);
    let m = network(bt.encapsulate(&p, &mut dst));

    // Altered anywhere in the sealed part: refused, and the untouched message still opens.
    for at in [DATA_HEADER_LEN, 40, m.len() - 1] {
        let mut bad = m.clone();
        bad[at] ^= 1;
        assert_eq!(t.open(&mut bad), Err(Error::Decrypt), "byte {at} flipped");
    }
    // The counter is part of the nonce: a changed counter does not open either.
    let mut bad = m.clone();
    bad[9] ^= 1;
    assert_eq!(t.open(&mut bad), Err(Error::Decrypt));
    let mut good = m.clone();
    assert_eq!(t.open(&mut good).expect("the real one"), &p[..]);
    // Replayed.
    let mut again = m.clone();
    assert_eq!(t.open(&mut again), Err(Error::Replay));
    // For another session, or not a data message, or too short.
    let mut other = m.clone();
    other[4] ^= 1;
    assert_eq!(t.open(&mut other), Err(Error::WrongIndex));
    let mut short = m[..DATA_OVERHEAD - 1].to_vec();
    assert_eq!(t.open(&mut short), Err(Error::Malformed));
    let mut kind = m.clone();
    kind[0] = 1;
    assert_eq!(t.open(&mut kind), Err(Error::Malformed));

    // An initiation for someone else, or altered, fails mac1 before any Diffie-Hellman.
    let (stranger, _) = keys(9);
    let mut init = [0u8; INITIATION_LEN];
    let (_, their_pub) = keys(2);
    initiate(&local(&ours), &their_pub, 1, [8; 32], now(), &mut init).expect("initiate");
    assert_eq!(
        receive_initiation(&local(&stranger), &init).err(),
        Some(Error::Mac1)
    );
    let (their_secret, _) = keys(2);
    assert!(receive_initiation(&local(&their_secret), &init).is_ok());
    let mut bad = init;
    bad[60] ^= 1;
    assert_eq!(
        receive_initiation(&local(&their_secret), &bad).err(),
        Some(Error::Mac1)
    );
    assert_eq!(
        receive_initiation(&local(&their_secret), &init[..100]).err(),
        Some(Error::Malformed)
    );
    // Opened in two halves (the node learns the sender first): the first half names the
    // initiator; the second takes only the initiation it was opened from.
    let theirs = local(&their_secret);
    let opened = open_initiation(&theirs, &init).expect("opened");
    assert_eq!(opened.peer().as_bytes(), local(&ours).public().as_bytes());
    let mut other = [0u8; INITIATION_LEN];
    initiate(&local(&ours), &their_pub, 2, [9; 32], now(), &mut other).expect("initiate");
    assert_eq!(
        opened.finish(&theirs, &other).err(),
        Some(Error::Decrypt),
        "a half opened from one initiation finished another"
    );
    let opened = open_initiation(&theirs, &init).expect("opened");
    let received = opened.finish(&theirs, &init).expect("finished");
    assert_eq!(received.remote_index, 1);
}

#[test]
fn a_wrong_response_leaves_the_initiation_waiting_for_the_right_one() {
    let (ours, our_pub) = keys(5);
    let (theirs, their_pub) = keys(6);
    let mut bt = Tunn::new(theirs, our_pub, None, None, 1, None);
    let mut init = [0u8; INITIATION_LEN];
    let initiated =
        initiate(&local(&ours), &their_pub, 77, [3; 32], now(), &mut init).expect("initiate");
    let mut dst = vec![0u8; 10_000];
    let response = network(bt.decapsulate(None, &init, &mut dst));
    let mut wrong_index = response.clone();
    wrong_index[8] ^= 1;
    assert_eq!(
        initiated
            .receive_response(&local(&ours), &NO_PSK, &wrong_index)
            .err(),
        Some(Error::WrongIndex)
    );
    let mut altered = response.clone();
    altered[20] ^= 1;
    assert_eq!(
        initiated
            .receive_response(&local(&ours), &NO_PSK, &altered)
            .err(),
        Some(Error::Mac1)
    );
    assert!(initiated
        .receive_response(&local(&ours), &NO_PSK, &response)
        .is_ok());
}

#[test]
fn boringtun_under_load_asks_for_a_cookie_and_takes_the_next_initiation_with_it() {
    let (ours, our_pub) = keys(7);
    let (theirs, their_pub) = keys(8);
    // A limit of 0: boringtun is under load from the first handshake on.
    let limiter = std::sync::Arc::new(RateLimiter::new(&their_pub, 0));
    let mut bt = Tunn::new(theirs, our_pub, None, None, 5, Some(limiter));
    let from: std::net::IpAddr = "192.0.2.7".parse().expect("address");
    let mut dst = vec![0u8; 10_000];
    let mut init = [0u8; INITIATION_LEN];
    let first =
        initiate(&local(&ours), &their_pub, 10, [1; 32], now(), &mut init).expect("initiate");
    let reply = network(bt.decapsulate(Some(from), &init, &mut dst));
    assert_eq!(
        reply.len(),
        COOKIE_REPLY_LEN,
        "a cookie reply, not a response"
    );
    let c = first.receive_cookie_reply(&reply).expect("open the cookie");
    // Not for another initiation of ours.
    let mut other = [0u8; INITIATION_LEN];
    let second_try =
        initiate(&local(&ours), &their_pub, 11, [2; 32], now(), &mut other).expect("initiate");
    assert!(second_try.receive_cookie_reply(&reply).is_err());
    // The next initiation proves the address with mac2 and is answered.
    add_mac2(&mut other, &c).expect("mac2");
    let response = network(bt.decapsulate(Some(from), &other, &mut dst));
    assert_eq!(response.len(), RESPONSE_LEN);
    second_try
        .receive_response(&local(&ours), &NO_PSK, &response)
        .expect("the response");
}

#[test]
fn boringtun_takes_our_cookie_reply_and_proves_its_address_with_it() {
    let (ours, our_pub) = keys(9);
    let (theirs, _) = keys(10);
    let mut bt = Tunn::new(theirs, our_pub, None, None, 5, None);
    let mut dst = vec![0u8; 10_000];
    let init = network(bt.format_handshake_initiation(&mut dst, false));
    let secret = [42u8; 32];
    let c = cookie(&secret, &[192, 0, 2, 7, 0xca, 0x6c]);
    assert!(!mac2_ok(&c, &init), "no cookie yet");
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    cookie_reply(&our_pub, &init, &c, [5; 24], &mut reply).expect("cookie reply");
    assert!(matches!(
        bt.decapsulate(None, &reply, &mut dst),
        TunnResult::Done
    ));
    let again = network(bt.format_handshake_initiation(&mut dst, true));
    assert!(
        mac2_ok(&c, &again),
        "boringtun's next initiation carries mac2 with our cookie"
    );
    assert!(receive_initiation(&local(&ours), &again).is_ok());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), kind in 1u8..5) {
        let (ours, _) = keys(11);
        let (_, peer) = keys(12);
        let mut m = bytes.clone();
        if let Some(b) = m.first_mut() { *b = kind; }
        let _ = receive_initiation(&local(&ours), &m);
        let mut init = [0u8; INITIATION_LEN];
        let initiated = initiate(&local(&ours), &peer, 1, [1; 32], [0; 12], &mut init).expect("initiate");
        let _ = initiated.receive_response(&local(&ours), &NO_PSK, &m);
        let _ = mesh_wg::receiver_index(&m);
        let mut resp = [0u8; RESPONSE_LEN];
        let (peer_secret, _) = keys(12);
        let received = receive_initiation(&local(&peer_secret), &init).expect("own initiation");
        let mut t = respond(received, &NO_PSK, 1, [2; 32], &mut resp).expect("respond");
        prop_assert!(t.open(&mut m).is_err());
    }
}
