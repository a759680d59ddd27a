//! JSON control messages: node ↔ controller, node ↔ standalone relay, and relay tickets.

use super::{check, committed, json_input, Decoder, Harness, Step};
use crate::mutate::{self, Mutator};
use crate::Outcome;
use mesh_proto::control::{
    decode_client, decode_server, ClientMsg, DecodeError, ErrorCode, PeerInfo, RelayInfo,
    Revocation, ServerMsg, Ticket, Welcome,
};
use mesh_proto::relay_session::{RelayClientMsg, RelayServerMsg};
use mesh_proto::PublicKey;
use mesh_relay::ticket::{Revocations, TicketError, MAX_REVOKED};
use mesh_relay::TicketKey;
use rand::rngs::SmallRng;
use rand::Rng;
use std::net::{Ipv4Addr, SocketAddr};

/// Longest input: room for the largest peer lists the JSON mutator makes.
const MAX_LEN: usize = 1 << 20;

fn decode_error(e: DecodeError) -> Outcome {
    match e {
        DecodeError::TooLong(_) => Outcome::new("too long"),
        DecodeError::Malformed(_) => Outcome::new("malformed"),
        DecodeError::Version(_) => Outcome::new("version"),
        DecodeError::Bounds(field) => Outcome::with("bounds", field),
    }
}

fn endpoints(n: u8) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            if i % 3 == 2 {
                SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(i)], 51820))
            } else {
                SocketAddr::from(([192, 0, 2, i], 51820 + u16::from(i)))
            }
        })
        .collect()
}

fn ticket(network: &str, expires: u64) -> Ticket {
    Ticket {
        network: network.into(),
        expires,
        mac: "5a".repeat(32),
    }
}

fn relay(name: &str) -> RelayInfo {
    RelayInfo {
        name: name.into(),
        addr: format!("{name}.relay.example.net:7000"),
        tcp: Some(format!("{name}.relay.example.net:443")),
        key: PublicKey([0x77; 32]),
        ticket: ticket("prod", 1_900_000_000),
        revoked: if name == "eu-1" {
            vec![Revocation {
                key: PublicKey([4; 32]),
                expires: 1_900_000_000,
                mac: "cd".repeat(32),
            }]
        } else {
            vec![]
        },
    }
}

fn peer(n: u8) -> PeerInfo {
    PeerInfo {
        key: PublicKey([n; 32]),
        name: format!("node-{n}"),
        address: Ipv4Addr::new(100, 64, n / 200, n),
        address6: n
            .is_multiple_of(4)
            .then(|| std::net::Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0, 0, 0, u16::from(n) + 1)),
        endpoints: endpoints(n % 5),
        relay: n.is_multiple_of(2).then(|| "eu-1".to_owned()),
        observed: n
            .is_multiple_of(3)
            .then(|| SocketAddr::from(([203, 0, 113, n], 40000))),
        nat: None,
        routes: Vec::new(),
        exits: Vec::new(),
    }
}

pub(super) fn client_messages() -> Vec<ClientMsg> {
    vec![
        ClientMsg::Join {
            token_id: "a1b2c3d4".into(),
            token_secret: "0f".repeat(32),
            name: "node-1".into(),
            endpoints: endpoints(3),
            exact_name: true,
        },
        ClientMsg::Join {
            token_id: "x".into(),
            token_secret: "ff".into(),
            name: "n".into(),
            endpoints: vec![],
            exact_name: false,
        },
        ClientMsg::RequestJoin {
            network: "prod".into(),
            name: "worker-3".into(),
            hostname: "worker-3.lab.example".into(),
            endpoints: endpoints(4),
            exact_name: false,
        },
        ClientMsg::Hello {
            network: "prod".into(),
            endpoints: endpoints(16),
            home_relay: Some("eu-1".into()),
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        },
        ClientMsg::Hello {
            network: "lab_2.example".into(),
            endpoints: vec![],
            home_relay: None,
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        },
        ClientMsg::Heartbeat {
            endpoints: endpoints(2),
            home_relay: None,
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        },
        ClientMsg::Heartbeat {
            endpoints: vec![],
            home_relay: Some("us-1".into()),
            nat: None,
            routes: Vec::new(),
            exits: Vec::new(),
        },
        ClientMsg::Leave,
    ]
}

pub(super) fn server_messages() -> Vec<ServerMsg> {
    let codes = [
        ErrorCode::TokenInvalid,
        ErrorCode::TokenExpired,
        ErrorCode::TokenRevoked,
        ErrorCode::TokenUsed,
        ErrorCode::NodeUnknown,
        ErrorCode::NetworkFull,
        ErrorCode::NameTaken,
        ErrorCode::BadRequest,
        ErrorCode::VersionMismatch,
        ErrorCode::Internal,
        ErrorCode::TicketInvalid,
        ErrorCode::TicketExpired,
    ];
    let mut out = vec![
        ServerMsg::Welcome(Welcome {
            network: "prod".into(),
            name: "node-1".into(),
            address: Ipv4Addr::new(100, 64, 0, 1),
            prefix_len: 16,
            address6: Some(std::net::Ipv6Addr::new(
                0xfd12, 0x3456, 0x789a, 0, 0, 0, 0, 1,
            )),
            prefix6: "fd12:3456:789a::/64".parse().ok(),
            peers: (2..6).map(peer).collect(),
            relays: vec![relay("eu-1")],
            observed: Some(SocketAddr::from(([203, 0, 113, 9], 40000))),
            observer: None,
            birthday_budget: None,
            controllers: vec!["ctl.example:7443".into(), "192.0.2.9:7443".into()],
            now: Some(1_796_300_000_123),
            more_peers: 0,
        }),
        ServerMsg::Welcome(Welcome {
            network: "n".into(),
            name: "a".into(),
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 30,
            address6: None,
            prefix6: None,
            peers: vec![],
            relays: vec![],
            observed: None,
            observer: None,
            birthday_budget: None,
            controllers: vec![],
            now: None,
            more_peers: 0,
        }),
        ServerMsg::Welcome(Welcome {
            network: "big".into(),
            name: "node-0".into(),
            address: Ipv4Addr::new(100, 64, 0, 200),
            prefix_len: 8,
            address6: None,
            prefix6: "fd00:1:2::/48".parse().ok(),
            peers: (1..=40).map(peer).collect(),
            relays: vec![relay("eu-1"), relay("us-1"), relay("ap-1")],
            observed: Some(SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9], 1))),
            observer: None,
            birthday_budget: None,
            controllers: vec![],
            now: None,
            // A large network's welcome: the rest of the list follows.
            more_peers: 2600,
        }),
        ServerMsg::Relays {
            relays: vec![relay("eu-1"), relay("us-1")],
        },
        ServerMsg::Relays { relays: vec![] },
        ServerMsg::PeersChanged {
            upsert: vec![peer(7)],
            remove: vec![PublicKey([2; 32]), PublicKey([3; 32])],
        },
        ServerMsg::PeersChanged {
            upsert: vec![],
            remove: vec![],
        },
        ServerMsg::Settings {
            birthday_budget: Some(8),
        },
        ServerMsg::Names {
            names: vec![mesh_proto::control::NameAlias {
                name: "k8s-api".into(),
                nodes: vec!["cp1".into(), "cp2".into()],
                down: vec!["cp2".into()],
            }],
        },
        ServerMsg::Left,
    ];
    out.extend(codes.into_iter().map(|code| ServerMsg::Error {
        code,
        message: format!("{code:?}: what to do about it"),
    }));
    out
}

pub(super) fn client() -> Decoder {
    let corpus = client_messages().iter().map(ClientMsg::encode).collect();
    Decoder::new("control_client", corpus, MAX_LEN, |b| {
        match decode_client(b) {
            Ok(m) => {
                check(
                    decode_client(&m.encode()).as_ref() == Ok(&m),
                    "an accepted client message encodes back to itself",
                );
                Outcome::with(
                    "ok",
                    match m {
                        ClientMsg::Join { .. } => "join",
                        ClientMsg::RequestJoin { .. } => "request_join",
                        ClientMsg::Hello { .. } => "hello",
                        ClientMsg::Heartbeat { .. } => "heartbeat",
                        ClientMsg::Leave => "leave",
                    },
                )
            }
            Err(e) => decode_error(e),
        }
    })
    .json()
}

pub(super) fn server() -> Decoder {
    let corpus = server_messages().iter().map(ServerMsg::encode).collect();
    Decoder::new("control_server", corpus, MAX_LEN, |b| {
        match decode_server(b) {
            Ok(m) => {
                check(
                    decode_server(&m.encode()).as_ref() == Ok(&m),
                    "an accepted server message encodes back to itself",
                );
                Outcome::with(
                    "ok",
                    match m {
                        ServerMsg::Welcome(_) => "welcome",
                        ServerMsg::Relays { .. } => "relays",
                        ServerMsg::PeersChanged { .. } => "peers_changed",
                        ServerMsg::Settings { .. } => "settings",
                        ServerMsg::Left => "left",
                        ServerMsg::Pending { .. } => "pending",
                        ServerMsg::Routes { .. } => "routes",
                        ServerMsg::Names { .. } => "names",
                        ServerMsg::Error { .. } => "error",
                    },
                )
            }
            Err(e) => decode_error(e),
        }
    })
    .json()
}

/// Both relay-session decoders on every input (a relay reads the one, a node the other).
pub(super) fn relay_session() -> Decoder {
    let mut corpus: Vec<Vec<u8>> = [
        RelayClientMsg::Hello {
            ticket: ticket("prod", 1_900_000_000),
        },
        RelayClientMsg::Renew {
            ticket: ticket("lab-2", 0),
        },
        RelayClientMsg::Revoke {
            network: "prod".into(),
            revoked: relay("eu-1").revoked,
        },
    ]
    .iter()
    .map(RelayClientMsg::encode)
    .collect();
    corpus.extend(
        [
            RelayServerMsg::Welcome {
                observed: SocketAddr::from(([203, 0, 113, 7], 40123)),
                expires: 1_900_000_000,
                revocations: false,
            },
            RelayServerMsg::Welcome {
                observed: SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7], 1)),
                expires: u64::MAX,
                revocations: true,
            },
            RelayServerMsg::Error {
                code: ErrorCode::TicketExpired,
                message: "ticket expired; the controller renews it".into(),
            },
        ]
        .iter()
        .map(RelayServerMsg::encode),
    );
    Decoder::new("relay_session", corpus, 1 << 16, |b| {
        let client = RelayClientMsg::decode(b);
        if let Ok(m) = &client {
            check(
                RelayClientMsg::decode(&m.encode()).as_ref() == Ok(m),
                "an accepted relay client message encodes back to itself",
            );
        }
        let server = RelayServerMsg::decode(b);
        if let Ok(m) = &server {
            check(
                RelayServerMsg::decode(&m.encode()).as_ref() == Ok(m),
                "an accepted relay server message encodes back to itself",
            );
        }
        match (client, server) {
            (Ok(RelayClientMsg::Hello { .. }), _) => Outcome::new("hello"),
            (Ok(RelayClientMsg::Renew { .. }), _) => Outcome::new("renew"),
            (Ok(RelayClientMsg::Revoke { .. }), _) => Outcome::new("revoke"),
            (_, Ok(RelayServerMsg::Welcome { .. })) => Outcome::new("welcome"),
            (_, Ok(RelayServerMsg::Error { .. })) => Outcome::new("error"),
            (Err(e), Err(_)) => decode_error(e),
        }
    })
    .json()
}

/// The controller's and the relay's private keys.
const CONTROLLER: [u8; 32] = [0x10; 32];
const RELAY: [u8; 32] = [0x20; 32];
/// Node keys presenting tickets.
const NODES: [PublicKey; 3] = [PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32])];
/// The relay's clock, Unix seconds.
const NOW: u64 = 1_800_000_000;

fn public(private: &[u8; 32]) -> PublicKey {
    let secret = x25519_dalek::StaticSecret::from(*private);
    PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

/// What a standalone relay does with a node's messages: decode, then verify a ticket for the
/// node key the Noise handshake proved (the step's `op` picks it), or verify and record
/// forwarded revocations.
pub(super) struct RelayTicket {
    /// (message bytes, node it was issued to).
    entries: Vec<(Vec<u8>, u8)>,
    corpus: Vec<Vec<u8>>,
    /// (network, node, expires) of every ticket issued.
    issued: Vec<(String, u8, u64)>,
    /// (network, node key, expires) of every revocation made.
    revoked: Vec<(String, PublicKey, u64)>,
    relay_key: TicketKey,
}

impl RelayTicket {
    pub(super) fn new() -> RelayTicket {
        let issuer = TicketKey::new(&CONTROLLER, &public(&RELAY));
        let issued: Vec<(String, u8, u64)> = vec![
            ("prod".into(), 0, 1_900_000_000),
            ("prod".into(), 1, NOW - 60),
            ("lab-2.example".into(), 2, NOW),
            ("a".into(), 0, u64::MAX),
        ];
        let mut entries = Vec::new();
        for (i, (network, node, expires)) in issued.iter().enumerate() {
            let ticket = issuer.issue(network, &NODES[usize::from(*node)], *expires);
            let msg = if i % 2 == 0 {
                RelayClientMsg::Hello { ticket }
            } else {
                RelayClientMsg::Renew { ticket }
            };
            entries.push((msg.encode(), *node));
        }
        let revoked: Vec<(String, PublicKey, u64)> = vec![
            ("prod".into(), NODES[1], NOW + 100),
            ("prod".into(), NODES[2], NOW - 100),
            ("lab-2.example".into(), NODES[0], u64::MAX),
        ];
        for network in ["prod", "lab-2.example"] {
            let msg = RelayClientMsg::Revoke {
                network: network.into(),
                revoked: revoked
                    .iter()
                    .filter(|(n, _, _)| n == network)
                    .map(|(n, k, e)| issuer.revoke(n, k, *e))
                    .collect(),
            };
            entries.push((msg.encode(), 0));
        }
        let mut corpus: Vec<Vec<u8>> = entries.iter().map(|(b, _)| b.clone()).collect();
        corpus.extend(committed("relay_ticket"));
        RelayTicket {
            entries,
            corpus,
            issued,
            revoked,
            relay_key: TicketKey::new(&RELAY, &public(&CONTROLLER)),
        }
    }
}

impl RelayTicket {
    fn revoke(&self, network: &str, revoked: &[Revocation]) -> Outcome {
        let mut table = Revocations::default();
        let mut valid = 0;
        for r in revoked {
            if !self.relay_key.verify_revocation(network, r) {
                continue;
            }
            valid += 1;
            check(
                self.revoked
                    .iter()
                    .any(|(n, k, e)| n == network && *k == r.key && *e == r.expires),
                "only a revocation the controller made verifies",
            );
            if table.insert(network, &r.key, r.expires, NOW) {
                check(
                    table.voids(network, &r.key, r.expires),
                    "a recorded revocation voids the tickets it names",
                );
            }
        }
        check(
            table.len() <= MAX_REVOKED,
            "the revocation table is bounded",
        );
        Outcome::with(
            "revoke",
            match (valid, revoked.len()) {
                (0, 0) => "empty",
                (0, _) => "none valid",
                (v, n) if v == n => "all valid",
                _ => "some valid",
            },
        )
    }
}

impl Harness for RelayTicket {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let (base, node) = &self.entries[rng.gen_range(0..self.entries.len())];
        // Mostly the node the ticket was issued to, sometimes another.
        let op = if rng.gen_range(0..4) == 0 {
            rng.gen_range(0..NODES.len() as u8)
        } else {
            *node
        };
        let bytes = match rng.gen_range(0..4) {
            0 => json_input(rng, &self.corpus, 1 << 16),
            1 => mutate::json::mutate(rng, base, &self.corpus).unwrap_or_else(|| base.clone()),
            2 => base.clone(),
            _ => {
                let mut b = base.clone();
                Mutator::new(&self.corpus, 1 << 16).mutate(rng, &mut b);
                b
            }
        };
        vec![Step { op, bytes }]
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        let Some(step) = case.first() else {
            return Outcome::new("empty");
        };
        let node = step.op % NODES.len() as u8;
        let ticket = match RelayClientMsg::decode(&step.bytes) {
            Ok(RelayClientMsg::Hello { ticket } | RelayClientMsg::Renew { ticket }) => ticket,
            Ok(RelayClientMsg::Revoke { network, revoked }) => {
                return self.revoke(&network, &revoked)
            }
            Err(e) => return decode_error(e),
        };
        let was_issued = self
            .issued
            .iter()
            .any(|(n, k, e)| *n == ticket.network && *k == node && *e == ticket.expires);
        match self
            .relay_key
            .verify(&ticket, &NODES[usize::from(node)], NOW)
        {
            Ok(()) => {
                check(
                    was_issued && ticket.expires >= NOW,
                    "only an issued, unexpired ticket verifies",
                );
                Outcome::new("valid")
            }
            Err(TicketError::Expired(ago)) => {
                check(
                    was_issued && ticket.expires.checked_add(ago) == Some(NOW),
                    "only an issued ticket is reported expired, with the right age",
                );
                Outcome::new("expired")
            }
            Err(TicketError::Invalid) => Outcome::new("invalid"),
        }
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        self.corpus.clone()
    }
}
