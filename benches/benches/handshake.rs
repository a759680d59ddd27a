//! What a handshake costs the node that receives it, with and without the handshake guard.
//!
//! - `x25519`: one Diffie-Hellman (the unit the guard's budget is sized in).
//! - `stranger_initiation`: what an initiation from an unknown key cost before the guard: the
//!   DH in `session::address_of` that finds out who sent it.
//! - `member_initiation`: the whole responder side for a known peer (identify, consume the
//!   initiation, build the response): what one token of the guard's budget may cost.
//! - `guard_pass` / `guard_over_budget`: the guard's own work per flood datagram (mac1, budget,
//!   cookie allowance), which is all a flood costs once the budget is spent.
//!
//! `benches/README.md` gives the figures and the budget they led to.

#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mesh_core::guard::{GuardConfig, HandshakeGuard, Verdict};
use mesh_core::session::{self, Output, Session};
use mesh_proto::PublicKey;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

fn initiation(from: &mut Session) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    match from.force_handshake(&mut buf, std::time::Instant::now()) {
        Output::Network(b) => b.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));

    let victim = StaticSecret::from([7u8; 32]);
    let victim_pub = XPublic::from(&victim);
    let victim_key = PublicKey(victim_pub.to_bytes());
    let victim_local = mesh_core::session::LocalKeys::new(victim.clone());
    let other = XPublic::from(&StaticSecret::from([8u8; 32]));
    g.bench_function("x25519", |b| {
        b.iter(|| black_box(victim.diffie_hellman(black_box(&other))))
    });

    let stranger = StaticSecret::from([9u8; 32]);
    let mut from_stranger = Session::new(
        stranger,
        victim_key,
        None,
        1,
        mesh_core::session::wall_clock(std::time::Instant::now()),
    );
    let init = initiation(&mut from_stranger);
    g.bench_function("stranger_initiation", |b| {
        b.iter(|| black_box(session::address_of(&victim_local, black_box(&init))))
    });

    let member = StaticSecret::from([10u8; 32]);
    let member_key = PublicKey(XPublic::from(&member).to_bytes());
    let mut initiator = Session::new(
        member,
        victim_key,
        None,
        2,
        mesh_core::session::wall_clock(std::time::Instant::now()),
    );
    let mut responder = Session::new(
        victim.clone(),
        member_key,
        None,
        3,
        mesh_core::session::wall_clock(std::time::Instant::now()),
    );
    // The responder's clock moves a second per initiation: one peer's initiations closer than
    // 20 ms are refused as a flood.
    let mut clock = std::time::Instant::now();
    let mut out = vec![0u8; 256];
    g.bench_function("member_initiation", |b| {
        b.iter_batched(
            || initiation(&mut initiator),
            |init| {
                // As the node takes it: the first half opened to find the session, the rest
                // finished there.
                let (who, opened) = session::address_opened(&victim_local, &init).unwrap();
                clock += std::time::Duration::from_secs(1);
                let response =
                    responder.decapsulate_opened(*opened.unwrap(), &init, &mut out, clock);
                assert!(matches!(response, Output::Network(_)));
                black_box(who)
            },
            BatchSize::SmallInput,
        )
    });

    let src = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)));
    let now = Instant::now();
    let roomy = GuardConfig {
        burst: u32::MAX,
        ..GuardConfig::default()
    };
    let mut guard = HandshakeGuard::new(&victim, roomy, now);
    g.bench_function("guard_pass", |b| {
        b.iter(|| assert_eq!(guard.check(src, black_box(&init), now), Verdict::Pass))
    });
    let mut guard = HandshakeGuard::new(&victim, GuardConfig::default(), now);
    while guard.check(None, &init, now) == Verdict::Pass {}
    while guard.check(src, &init, now) != Verdict::OverBudget {}
    g.bench_function("guard_over_budget", |b| {
        b.iter(|| assert_eq!(guard.check(src, black_box(&init), now), Verdict::OverBudget))
    });
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
