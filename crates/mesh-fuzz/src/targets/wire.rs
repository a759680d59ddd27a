//! Binary and text formats of `mesh-proto`: datagram demux, relay frames and their reassembly,
//! join tokens, keys and hex.

use super::{check, committed, Decoder, Harness, Step};
use crate::mutate::Mutator;
use crate::Outcome;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mesh_proto::demux::{classify, DatagramKind, STUN_MAGIC_COOKIE};
use mesh_proto::relay::{self, RelayError, HEADER_LEN, MAX_FRAGMENTS, MAX_MESSAGE};
use mesh_proto::token::{JoinArg, JoinToken, NetworkId, TokenError};
use mesh_proto::{hex, PublicKey};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Relay frame keys of the corpus.
const KEYS: [PublicKey; 3] = [
    PublicKey([1; 32]),
    PublicKey([0x42; 32]),
    PublicKey([0xfe; 32]),
];

/// Random bytes from a fixed seed: corpus contents that do not depend on the run's seed.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// WireGuard-, QUIC- and STUN-shaped datagrams (the node and tunnel targets use real
/// WireGuard messages; here the first bytes are what matters).
fn datagrams() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (kind, len) in [(1u8, 148), (2, 92), (3, 64), (4, 32), (4, 32 + 84)] {
        let mut d = filler(u64::from(kind) * 1000 + len as u64, len);
        d[..4].copy_from_slice(&[kind, 0, 0, 0]);
        out.push(d);
    }
    // QUIC long header (Initial, version 1, 8-byte connection ids) and short header.
    let mut initial = vec![0xc3, 0, 0, 0, 1, 8];
    initial.extend(filler(1, 8));
    initial.push(8);
    initial.extend(filler(2, 8));
    initial.extend([0, 0x44, 0xc8]);
    initial.extend(filler(3, 1200 - initial.len()));
    out.push(initial);
    let mut short = vec![0x41];
    short.extend(filler(4, 40));
    out.push(short);
    // STUN binding request with a SOFTWARE attribute.
    let mut stun = vec![0x00, 0x01, 0x00, 0x08];
    stun.extend_from_slice(&STUN_MAGIC_COOKIE);
    stun.extend(filler(5, 12));
    stun.extend([0x80, 0x22, 0x00, 0x04, b'm', b'e', b's', b'h']);
    out.push(stun);
    out
}

pub(super) fn demux() -> Decoder {
    Decoder::new("demux", datagrams(), 1500, |b| {
        let kind = classify(b);
        let wireguard = b.len() >= 4 && (1..=4).contains(&b[0]) && b[1..4] == [0, 0, 0];
        let quic = !wireguard && b.first().is_some_and(|f| f & 0x40 != 0);
        let stun = !wireguard
            && !quic
            && b.len() >= 20
            && b[0] & 0xc0 == 0
            && b[4..8] == STUN_MAGIC_COOKIE;
        let expected = match (wireguard, quic, stun) {
            (true, _, _) => DatagramKind::WireGuard,
            (_, true, _) => DatagramKind::Quic,
            (_, _, true) => DatagramKind::Stun,
            _ => DatagramKind::Unknown,
        };
        check(kind == expected, "demux follows its documented rules");
        Outcome::new(match kind {
            DatagramKind::WireGuard => "wireguard",
            DatagramKind::Quic => "quic",
            DatagramKind::Stun => "stun",
            DatagramKind::Unknown => "unknown",
        })
    })
}

/// Real frames: messages of several sizes split for several datagram sizes.
fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (len, max)) in [
        (1usize, 1200usize),
        (32, 1200),
        (148, 1200),
        (1452, 1150),
        (1452, 1500),
        (3000, 1150),
        (MAX_MESSAGE, 1200),
        (MAX_MESSAGE, 1100),
        (90, 60),
    ]
    .into_iter()
    .enumerate()
    {
        let msg = filler(100 + i as u64, len);
        let key = KEYS[i % KEYS.len()];
        if let Ok(frames) = relay::encode(&key, i as u16 * 257, &msg, max) {
            out.extend(frames);
        }
    }
    out
}

fn relay_error(e: RelayError) -> Outcome {
    Outcome::new(match e {
        RelayError::Short => "short",
        RelayError::Version(_) => "version",
        RelayError::Fragment => "fragment",
        RelayError::Size => "size",
    })
}

pub(super) fn relay_frame() -> Decoder {
    Decoder::new("relay_frame", frames(), 1600, |b| {
        let mut rekeyed = b.to_vec();
        let set = relay::set_key(&mut rekeyed, &PublicKey([9; 32]));
        let f = match relay::decode(b) {
            Ok(f) => f,
            Err(e) => {
                check(
                    set.is_ok() == (b.len() > HEADER_LEN),
                    "set_key refuses exactly the frames too short to hold a key",
                );
                return relay_error(e);
            }
        };
        check(
            f.count >= 1 && usize::from(f.count) <= MAX_FRAGMENTS && f.index < f.count,
            "fragment fields in range",
        );
        check(!f.chunk.is_empty(), "a frame carries at least one byte");
        let mut again = vec![relay::VERSION, (f.index << 4) | f.count];
        again.extend_from_slice(&f.id.to_be_bytes());
        again.extend_from_slice(&f.key.0);
        again.extend_from_slice(f.chunk);
        check(again == b, "a decoded frame is its bytes");
        if f.count == 1 && f.chunk.len() <= MAX_MESSAGE {
            let encoded = relay::encode(&f.key, f.id, f.chunk, b.len());
            check(
                encoded == Ok(vec![b.to_vec()]),
                "a whole frame encodes back",
            );
        }
        let r = relay::decode(&rekeyed);
        check(
            set.is_ok()
                && r.is_ok_and(|g| {
                    g.key == PublicKey([9; 32])
                        && (g.id, g.index, g.chunk) == (f.id, f.index, f.chunk)
                }),
            "set_key changes the key and nothing else",
        );
        Outcome::with("ok", if f.count == 1 { "whole" } else { "fragment" })
    })
}

/// The key of the message whose delivery each input checks; no corpus frame carries it.
const CANARY: PublicKey = PublicKey([0xca; 32]);

/// `relay::Reassembly` fed runs of frames (mutated and real) with time passing, each run with
/// one real message (the canary) whose fragments arrive in random order among the others.
pub(super) struct Reassembly {
    corpus: Vec<Vec<u8>>,
    start: Instant,
}

impl Reassembly {
    pub(super) fn new() -> Reassembly {
        let mut corpus = frames();
        corpus.extend(committed("relay_reassembly"));
        Reassembly {
            corpus,
            start: Instant::now(),
        }
    }
}

/// Time before a step, in units of 10 ms: mostly short, now and then long enough to expire
/// what is pending.
fn pause(rng: &mut SmallRng) -> u8 {
    if rng.gen_range(0..16) == 0 {
        rng.gen_range(50..=255)
    } else {
        rng.gen_range(0..=5)
    }
}

/// Runs at least this long are floods (over the pending bound) or sprays.
const SPRAY: usize = 300;

impl Reassembly {
    /// `n` steps of corpus frames, mostly mutated.
    fn run(&self, rng: &mut SmallRng, m: &Mutator<'_>, n: usize) -> Vec<Step> {
        (0..n)
            .map(|_| Step {
                op: pause(rng),
                bytes: if rng.gen_range(0..4) == 0 {
                    m.pick(rng)
                } else {
                    m.input(rng)
                },
            })
            .collect()
    }
}

impl Harness for Reassembly {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let m = Mutator::new(&self.corpus, 1600);
        let (mut steps, canary) = match rng.gen_range(0..128) {
            // A flood of mutated frames, past the pending bound.
            0 => {
                let n = rng.gen_range(SPRAY..600);
                (self.run(rng, &m, n), false)
            }
            // One sender sprays first fragments that never complete: the canary, from another
            // sender, must still get through.
            1 => {
                let sprayer = KEYS[rng.gen_range(0..KEYS.len())];
                let spray = (0..rng.gen_range(SPRAY..600))
                    .filter_map(|_| {
                        let f = relay::encode(&sprayer, rng.gen(), &[0x5a; 2000], 1200).ok()?;
                        Some(Step {
                            op: 0,
                            bytes: f.into_iter().next()?,
                        })
                    })
                    .collect();
                (spray, true)
            }
            _ => {
                let n = rng.gen_range(1..=40);
                (self.run(rng, &m, n), rng.gen_range(0..4) != 0)
            }
        };
        if canary {
            let len = if rng.gen() {
                rng.gen_range(1..=1500)
            } else {
                rng.gen_range(1..=MAX_MESSAGE)
            };
            let msg: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let room = len.div_ceil(rng.gen_range(1..=MAX_FRAGMENTS));
            if let Ok(mut frames) = relay::encode(&CANARY, rng.gen(), &msg, HEADER_LEN + room) {
                frames.shuffle(rng);
                for f in frames {
                    let at = rng.gen_range(0..=steps.len());
                    steps.insert(
                        at,
                        Step {
                            op: pause(rng),
                            bytes: f,
                        },
                    );
                }
            }
        }
        steps
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        let mut r = relay::Reassembly::default();
        let mut now = self.start;
        let mut canary: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        let mut canary_times: Option<(Instant, Instant)> = None;
        let mut delivered = 0;
        let mut others = 0;
        let mut dropped = 0;
        for step in case {
            now += Duration::from_millis(u64::from(step.op) * 10);
            let Ok(frame) = relay::decode(&step.bytes) else {
                continue;
            };
            if frame.key == CANARY {
                canary.insert(frame.index, frame.chunk.to_vec());
                canary_times = Some(canary_times.map_or((now, now), |(first, _)| (first, now)));
            }
            let multi = frame.count > 1;
            if let Some((key, msg)) = r.push(frame, now) {
                if key == CANARY {
                    delivered += 1;
                    let sent: Vec<u8> = canary.values().flatten().copied().collect();
                    check(msg == sent, "the message is reassembled as sent");
                } else {
                    others += 1;
                    check(
                        !multi || msg.len() <= MAX_MESSAGE,
                        "a reassembled message is within MAX_MESSAGE",
                    );
                }
            }
            check(r.dropped() >= dropped, "the drop count only grows");
            dropped = r.dropped();
        }
        let detail = if case.len() >= SPRAY {
            "spray"
        } else if others > 0 {
            "others completed"
        } else {
            ""
        };
        match canary_times {
            None if case.len() >= SPRAY => Outcome::with("flood", detail),
            None => Outcome::with("no canary", detail),
            Some((first, last)) => {
                let in_time = last.duration_since(first) < relay::REASSEMBLY_TIMEOUT;
                check(
                    delivered == usize::from(in_time),
                    "a message whose fragments all came in time is delivered once, else never",
                );
                Outcome::with(
                    if in_time {
                        "canary delivered"
                    } else {
                        "canary expired"
                    },
                    detail,
                )
            }
        }
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        self.corpus.clone()
    }
}

fn tokens() -> Vec<JoinToken> {
    [
        ("192.0.2.1:7443", "a1b2c3d4"),
        ("[2001:db8::1]:7443", "0123456789abcdef"),
        ("controller.example.net:443", "x"),
        ("é.example:1", "tok-é"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (controller, id))| JoinToken {
        controller: controller.into(),
        controller_key: PublicKey(filler(200 + i as u64, 32).try_into().unwrap_or([0; 32])),
        id: id.into(),
        secret: filler(300 + i as u64, 32).try_into().unwrap_or([0; 32]),
        // Every other seed carries a TCP address (a version 2 token).
        controller_tcp: (i % 2 == 1).then(|| "controller.example.net:443".to_owned()),
        controller_others: Vec::new(),
    })
    .collect()
}

fn network_ids() -> Vec<NetworkId> {
    (0..3u64)
        .map(|i| NetworkId {
            controller: mesh_proto::token::ControllerRef {
                addr: "192.0.2.1:7443".into(),
                key: PublicKey(filler(400 + i, 32).try_into().unwrap_or([0; 32])),
                tcp: (i > 0).then(|| "192.0.2.1:443".to_owned()),
                others: (0..i).map(|j| format!("198.51.100.{j}:7443")).collect(),
            },
            network: format!("net-{i}"),
        })
        .collect()
}

/// `JoinToken::from_str` (and the network id and `mesh join` argument parsers) on mutated token text, and on tokens whose decoded layout was
/// mutated and encoded again (so inputs get past base64 into the layout reader).
pub(super) struct Token {
    corpus: Vec<Vec<u8>>,
    bodies: Vec<Vec<u8>>,
}

impl Token {
    pub(super) fn new() -> Token {
        let mut corpus: Vec<Vec<u8>> = tokens()
            .iter()
            .map(|t| t.to_string().into_bytes())
            .collect();
        corpus.extend(network_ids().iter().map(|n| n.to_string().into_bytes()));
        corpus.extend(committed("token"));
        let bodies = corpus
            .iter()
            .filter_map(|t| {
                let text = std::str::from_utf8(t).ok()?.trim();
                let body = text
                    .strip_prefix("mesh1_")
                    .or_else(|| text.strip_prefix("meshnet1_"))?;
                URL_SAFE_NO_PAD.decode(body).ok()
            })
            .collect();
        Token { corpus, bodies }
    }
}

impl Harness for Token {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let bytes = if rng.gen() {
            Mutator::new(&self.corpus, 700).input(rng)
        } else {
            let m = Mutator::new(&self.bodies, 600);
            let body = m.input(rng);
            let prefix = if rng.gen() { "mesh1_" } else { "meshnet1_" };
            format!("{prefix}{}", URL_SAFE_NO_PAD.encode(body)).into_bytes()
        };
        vec![Step { op: 0, bytes }]
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        let Some(step) = case.first() else {
            return Outcome::new("empty");
        };
        let text = String::from_utf8_lossy(&step.bytes);
        if let Ok(n) = text.parse::<NetworkId>() {
            check(
                n.to_string().parse::<NetworkId>().as_ref() == Ok(&n),
                "an accepted network id encodes back to itself",
            );
        }
        let _ = text.parse::<JoinArg>();
        match text.parse::<JoinToken>() {
            Ok(t) => {
                check(
                    t.to_string().parse::<JoinToken>().as_ref() == Ok(&t),
                    "an accepted token encodes back to itself",
                );
                check(
                    !format!("{t:?}").contains(&t.secret_hex()),
                    "the secret never shows in Debug",
                );
                Outcome::new("ok")
            }
            Err(TokenError::Prefix) => Outcome::new("prefix"),
            Err(TokenError::Damaged(why)) => Outcome::with("damaged", why),
            Err(TokenError::Newer(_)) => Outcome::new("newer"),
            Err(TokenError::NetworkDamaged(_) | TokenError::NetworkNewer(_)) => {
                Outcome::new("network")
            }
        }
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        self.corpus.clone()
    }
}

pub(super) fn key() -> Decoder {
    let mut corpus = Vec::new();
    for i in 0..4u64 {
        let k = PublicKey(filler(400 + i, 32).try_into().unwrap_or([0; 32]));
        corpus.push(k.to_string().into_bytes());
        corpus.push(format!(" {k}\n").into_bytes());
        corpus.push(hex::encode(&k.0).into_bytes());
        corpus.push(
            hex::encode(&filler(500 + i, 32))
                .to_uppercase()
                .into_bytes(),
        );
    }
    Decoder::new("key", corpus, 200, |b| {
        let text = String::from_utf8_lossy(b);
        let key = text.parse::<PublicKey>();
        if let Ok(k) = &key {
            check(
                k.to_string().parse::<PublicKey>().as_ref() == Ok(k),
                "an accepted key prints back to itself",
            );
        }
        let bytes = hex::decode(&text);
        if let Some(v) = &bytes {
            check(
                hex::encode(v) == text.to_ascii_lowercase(),
                "accepted hex is the lowercase encoding of its bytes",
            );
        }
        Outcome::with(
            if key.is_ok() { "key" } else { "not key" },
            if bytes.is_some() { "hex" } else { "not hex" },
        )
    })
}
