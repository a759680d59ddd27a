//! `Tunnel`: two of them on a clock the test moves (handshake, queue, WireGuard's timers), and
//! one against boringtun's `Tunn` both ways.

mod common;
use common::{keys, packet};

use boringtun::noise::{Tunn, TunnResult};
use mesh_wg::tunnel::{
    KEEPALIVE_TIMEOUT, MAX_QUEUED, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
};
use mesh_wg::{Action, Error, Tunnel, DATA_HEADER_LEN, INITIATION_LEN, RESPONSE_LEN};
use rand::rngs::OsRng;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn wall(now: Instant) -> (Duration, Instant) {
    (
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
        now,
    )
}

/// Two tunnels, A (index 1) and B (index 2), and a clock.
struct Pair {
    a: Tunnel,
    b: Tunnel,
    now: Instant,
}

impl Pair {
    fn new(keepalive: Option<Duration>) -> Pair {
        let now = Instant::now();
        let (sa, pa) = keys(1);
        let (sb, pb) = keys(2);
        Pair {
            a: Tunnel::new(sa.into(), pb, None, keepalive, 1, wall(now)),
            b: Tunnel::new(sb.into(), pa, None, keepalive, 2, wall(now)),
            now,
        }
    }

    fn later(&mut self, d: Duration) {
        self.now += d;
    }
}

/// Hands `msg` to `to` and returns what it did, with its output buffer (twice, for the
/// callers that name the packet apart from the answer).
fn deliver(to: &mut Tunnel, msg: &[u8], now: Instant) -> (Action, Vec<u8>, Vec<u8>) {
    let mut out = vec![0u8; 2048];
    let action = to.receive(msg, &mut out, now, &mut OsRng);
    (action, out.clone(), out)
}

fn sent(action: Action, out: &[u8]) -> Vec<u8> {
    match action {
        Action::Send(n) => out[..n].to_vec(),
        other => panic!("expected a message to send, got {other:?}"),
    }
}

/// A sends one packet to B through a fresh handshake: the packet waits, the initiation goes,
/// the response comes, the packet follows and B delivers it.
fn handshake_with_packet(p: &mut Pair, data: &[u8]) {
    let mut out = vec![0u8; 2048];
    let act = p.a.send(data, &mut out, p.now, &mut OsRng);
    let init = sent(act, &out);
    assert_eq!(init.len(), INITIATION_LEN);
    assert_eq!(p.a.queued(), 1);
    let (act, out_b, _) = deliver(&mut p.b, &init, p.now);
    let response = sent(act, &out_b);
    assert_eq!(response.len(), RESPONSE_LEN);
    assert!(
        !p.b.established(p.now),
        "a responder waits for the initiator's data"
    );
    let (act, out_a, _) = deliver(&mut p.a, &response, p.now);
    let first = sent(act, &out_a);
    assert!(p.a.established(p.now));
    assert_eq!(p.a.queued(), 0);
    let (act, _, datagram) = deliver(&mut p.b, &first, p.now);
    assert_eq!(act, Action::Deliver(data.len()));
    assert_eq!(&datagram[..data.len()], data);
    assert!(
        p.b.established(p.now),
        "the first data message confirms B's session"
    );
}

/// Seals with `from` and opens with `to`; returns what `to` did.
fn one_way(from: &mut Tunnel, to: &mut Tunnel, data: &[u8], now: Instant) -> Action {
    let mut buf = vec![0u8; data.len() + 64];
    buf[DATA_HEADER_LEN..DATA_HEADER_LEN + data.len()].copy_from_slice(data);
    let n = from.seal(&mut buf, data.len(), now).expect("seal");
    deliver(to, &buf[..n], now).0
}

#[test]
fn a_packet_waits_for_the_handshake_and_then_flows_both_ways() {
    let mut p = Pair::new(None);
    let data = packet(1400, 7);
    handshake_with_packet(&mut p, &data);
    let now = p.now;
    assert_eq!(
        one_way(&mut p.b, &mut p.a, &packet(60, 1), now),
        Action::Deliver(60)
    );
    assert_eq!(
        one_way(&mut p.a, &mut p.b, &packet(61, 2), now),
        Action::Deliver(61)
    );
    let stats = p.a.stats(now);
    assert_eq!(stats.tx_bytes, 1400 + 61);
    assert_eq!(stats.rx_bytes, 60);
    assert!(stats.rtt.is_some());
    // A padded packet is delivered at the length its header says.
    let mut padded = packet(45, 3);
    padded.resize(48, 0);
    assert_eq!(
        one_way(&mut p.a, &mut p.b, &padded, now),
        Action::Deliver(45)
    );
}

#[test]
fn an_unanswered_initiation_is_sent_again_and_given_up_after_the_attempt_time() {
    let mut p = Pair::new(None);
    let mut out = vec![0u8; 2048];
    let act = p.a.send(&packet(100, 1), &mut out, p.now, &mut OsRng);
    assert_eq!(act, Action::Send(INITIATION_LEN));
    // A second packet waits without a second initiation.
    assert_eq!(
        p.a.send(&packet(100, 2), &mut out, p.now, &mut OsRng),
        Action::Done
    );
    assert_eq!(p.a.next_deadline(), Some(p.now + REKEY_TIMEOUT));
    p.later(REKEY_TIMEOUT - Duration::from_millis(1));
    assert_eq!(p.a.update_timers(&mut out, p.now, &mut OsRng), Action::Done);
    p.later(Duration::from_millis(1));
    assert_eq!(
        p.a.update_timers(&mut out, p.now, &mut OsRng),
        Action::Send(INITIATION_LEN)
    );
    let mut resent = 1;
    let start = p.now - REKEY_TIMEOUT;
    while p.now < start + REKEY_ATTEMPT_TIME - REKEY_TIMEOUT {
        p.later(REKEY_TIMEOUT);
        if p.a.update_timers(&mut out, p.now, &mut OsRng) == Action::Send(INITIATION_LEN) {
            resent += 1;
        }
    }
    assert_eq!(resent, 17, "every 5 s within the 90 s attempt");
    p.later(REKEY_TIMEOUT);
    assert_eq!(
        p.a.update_timers(&mut out, p.now, &mut OsRng),
        Action::Expired
    );
    assert_eq!(p.a.queued(), 0, "the waiting packets are dropped");
    assert_eq!(p.a.next_deadline(), None);
}

#[test]
fn the_initiator_rekeys_and_the_old_session_still_opens_in_flight_messages() {
    let mut p = Pair::new(None);
    handshake_with_packet(&mut p, &packet(100, 1));
    // A message sealed under the old session, delivered after the new one is up.
    let mut late = vec![0u8; 200];
    let data = packet(100, 9);
    late[DATA_HEADER_LEN..DATA_HEADER_LEN + 100].copy_from_slice(&data);
    let n = p.a.seal(&mut late, 100, p.now).expect("seal");
    late.truncate(n);

    p.later(REKEY_AFTER_TIME);
    assert!(p.a.next_deadline().is_some_and(|d| d <= p.now));
    let mut out = vec![0u8; 2048];
    let init = sent(p.a.update_timers(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(init.len(), INITIATION_LEN);
    assert!(
        p.a.established(p.now),
        "the old session still seals meanwhile"
    );
    let (act, out_b, _) = deliver(&mut p.b, &init, p.now);
    let response = sent(act, &out_b);
    let (act, out_a, _) = deliver(&mut p.a, &response, p.now);
    let keepalive = sent(act, &out_a);
    assert_eq!(deliver(&mut p.b, &keepalive, p.now).0, Action::Keepalive);
    assert_eq!(p.a.stats(p.now).since_handshake, Some(Duration::ZERO));
    // The late message opens under the previous session.
    assert_eq!(deliver(&mut p.b, &late, p.now).0, Action::Deliver(100));
    let now = p.now;
    assert_eq!(
        one_way(&mut p.b, &mut p.a, &packet(70, 1), now),
        Action::Deliver(70)
    );
}

#[test]
fn received_data_is_answered_with_a_keepalive_and_sessions_expire() {
    let mut p = Pair::new(None);
    handshake_with_packet(&mut p, &packet(100, 1));
    let mut out = vec![0u8; 2048];
    // B received data and sent nothing: a keepalive after KEEPALIVE_TIMEOUT.
    assert_eq!(p.b.next_deadline(), Some(p.now + KEEPALIVE_TIMEOUT));
    p.later(KEEPALIVE_TIMEOUT);
    let keepalive = sent(p.b.update_timers(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(deliver(&mut p.a, &keepalive, p.now).0, Action::Keepalive);
    assert_eq!(
        p.b.update_timers(&mut out, p.now, &mut OsRng),
        Action::Done,
        "only one"
    );
    // Past REJECT_AFTER_TIME nothing seals or opens; past three times that, all is cleared.
    p.later(REJECT_AFTER_TIME);
    assert!(!p.b.established(p.now));
    let mut buf = vec![0u8; 100];
    assert_eq!(p.b.seal(&mut buf, 20, p.now), Err(Error::Exhausted));
    p.later(REJECT_AFTER_TIME * 2);
    assert_eq!(
        p.b.update_timers(&mut out, p.now, &mut OsRng),
        Action::Expired
    );
    assert_eq!(p.b.stats(p.now).since_handshake, None);
}

#[test]
fn a_persistent_keepalive_goes_out_on_its_interval() {
    let every = Duration::from_secs(25);
    let mut p = Pair::new(Some(every));
    handshake_with_packet(&mut p, &packet(100, 1));
    let mut out = vec![0u8; 2048];
    p.later(KEEPALIVE_TIMEOUT);
    // B answers the data with a keepalive (else A would take the silence for a dead session
    // after 15 s and shake hands again).
    let answer = sent(p.b.update_timers(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(deliver(&mut p.a, &answer, p.now).0, Action::Keepalive);
    p.later(every - KEEPALIVE_TIMEOUT);
    let k = sent(p.a.update_timers(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(deliver(&mut p.b, &k, p.now).0, Action::Keepalive);
    assert_eq!(p.a.update_timers(&mut out, p.now, &mut OsRng), Action::Done);
}

#[test]
fn data_sent_into_silence_starts_a_new_handshake() {
    let mut p = Pair::new(None);
    handshake_with_packet(&mut p, &packet(100, 1));
    let mut out = vec![0u8; 2048];
    // B's keepalive answers; then A sends and hears nothing back.
    p.later(KEEPALIVE_TIMEOUT);
    let answer = sent(p.b.update_timers(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(deliver(&mut p.a, &answer, p.now).0, Action::Keepalive);
    let mut buf = vec![0u8; 200];
    buf[DATA_HEADER_LEN..DATA_HEADER_LEN + 40].copy_from_slice(&packet(40, 2));
    p.a.seal(&mut buf, 40, p.now).expect("seal");
    assert_eq!(
        p.a.next_deadline(),
        Some(p.now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
    );
    p.later(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - Duration::from_millis(1));
    assert_eq!(p.a.update_timers(&mut out, p.now, &mut OsRng), Action::Done);
    p.later(Duration::from_millis(1));
    assert_eq!(
        p.a.update_timers(&mut out, p.now, &mut OsRng),
        Action::Send(INITIATION_LEN)
    );
}

#[test]
fn replayed_initiations_and_floods_are_refused() {
    let mut p = Pair::new(None);
    let mut out = vec![0u8; 2048];
    let init = sent(p.a.initiate(&mut out, p.now, &mut OsRng), &out);
    assert_eq!(
        deliver(&mut p.b, &init, p.now).0,
        Action::Send(RESPONSE_LEN)
    );
    p.later(Duration::from_secs(1));
    assert_eq!(
        deliver(&mut p.b, &init, p.now).0,
        Action::Refused(Error::Replay)
    );
    // Newer ones (later timestamps): within the flood gap of the last one accepted, refused;
    // after it, answered.
    let accepted_at = p.now;
    let a_newer = sent(
        p.a.initiate(&mut out, p.now + Duration::from_secs(1), &mut OsRng),
        &out,
    );
    p.later(Duration::from_millis(5));
    assert_eq!(
        deliver(&mut p.b, &a_newer, p.now).0,
        Action::Send(RESPONSE_LEN)
    );
    let newest = sent(
        p.a.initiate(&mut out, p.now + Duration::from_secs(2), &mut OsRng),
        &out,
    );
    let too_soon = deliver(&mut p.b, &newest, p.now + Duration::from_millis(10)).0;
    assert_eq!(
        too_soon,
        Action::Refused(Error::Replay),
        "within 20 ms of the last accepted"
    );
    let in_time = deliver(&mut p.b, &newest, p.now + Duration::from_millis(25)).0;
    assert_eq!(in_time, Action::Send(RESPONSE_LEN));
    assert!(accepted_at < p.now);
    // From another key: refused.
    let (sc, _) = keys(3);
    let (_, pb) = keys(2);
    let mut stranger = Tunnel::new(sc.into(), pb, None, None, 9, wall(p.now));
    let init = sent(stranger.initiate(&mut out, p.now, &mut OsRng), &out);
    p.later(Duration::from_secs(1));
    assert!(matches!(
        deliver(&mut p.b, &init, p.now).0,
        Action::Refused(_)
    ));
}

#[test]
fn the_queue_is_bounded() {
    let mut p = Pair::new(None);
    let mut out = vec![0u8; 2048];
    for i in 0..MAX_QUEUED + 10 {
        let _ = p.a.send(&packet(40, i as u8), &mut out, p.now, &mut OsRng);
    }
    assert_eq!(p.a.queued(), MAX_QUEUED);
}

#[test]
fn a_tunnel_and_boringtun_shake_hands_and_talk_both_ways() {
    for we_initiate in [true, false] {
        let now = Instant::now();
        let (ours, our_pub) = keys(11);
        let (theirs, their_pub) = keys(12);
        let mut t = Tunnel::new(ours.into(), their_pub, None, None, 3, wall(now));
        let mut bt = Tunn::new(theirs, our_pub, None, None, 4, None);
        let mut out = vec![0u8; 4096];
        let mut dst = vec![0u8; 4096];
        let data = packet(1400, 0x42);
        if we_initiate {
            let init = sent(t.send(&data, &mut out, now, &mut OsRng), &out);
            let resp = match bt.decapsulate(None, &init, &mut dst) {
                TunnResult::WriteToNetwork(m) => m.to_vec(),
                other => panic!("{other:?}"),
            };
            let (act, out_t, _) = deliver(&mut t, &resp, now);
            let first = sent(act, &out_t);
            match bt.decapsulate(None, &first, &mut dst) {
                TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &data[..]),
                other => panic!("{other:?}"),
            }
        } else {
            let init = match bt.format_handshake_initiation(&mut dst, false) {
                TunnResult::WriteToNetwork(m) => m.to_vec(),
                other => panic!("{other:?}"),
            };
            let (act, out_t, _) = deliver(&mut t, &init, now);
            let resp = sent(act, &out_t);
            let keepalive = match bt.decapsulate(None, &resp, &mut dst) {
                TunnResult::WriteToNetwork(m) => m.to_vec(),
                other => panic!("{other:?}"),
            };
            assert_eq!(deliver(&mut t, &keepalive, now).0, Action::Keepalive);
            assert!(t.established(now));
        }
        // boringtun to us, and us to boringtun.
        let m = match bt.encapsulate(&data, &mut dst) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("{other:?}"),
        };
        let (act, _, datagram) = deliver(&mut t, &m, now);
        assert_eq!(act, Action::Deliver(1400));
        assert_eq!(&datagram[..1400], &data[..]);
        let reply = packet(300, 0x24);
        let m = sent(t.send(&reply, &mut out, now, &mut OsRng), &out);
        match bt.decapsulate(None, &m, &mut dst) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &reply[..]),
            other => panic!("{other:?}"),
        }
    }
}

proptest::proptest! {
    /// Whatever arrives, nothing panics, and a session that was up stays up and still works.
    #[test]
    fn arbitrary_datagrams_change_nothing(
        datagrams in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), 1..8),
        kinds in proptest::collection::vec(1u8..6, 8),
    ) {
        let mut p = Pair::new(None);
        handshake_with_packet(&mut p, &packet(100, 1));
        for (d, k) in datagrams.iter().zip(&kinds) {
            let mut d = d.clone();
            if let Some(b) = d.first_mut() { *b = *k; }
            let (act, _, _) = deliver(&mut p.b, &d, p.now);
            proptest::prop_assert!(matches!(act, Action::Refused(_)), "{act:?}");
        }
        proptest::prop_assert!(p.b.established(p.now));
        let now = p.now;
        proptest::prop_assert_eq!(one_way(&mut p.a, &mut p.b, &packet(50, 5), now), Action::Deliver(50));
    }
}
