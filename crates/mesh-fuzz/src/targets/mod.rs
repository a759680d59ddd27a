//! The fuzz targets: one per decoder of untrusted bytes, plus a whole node and a node pair.

mod control;
mod node;
mod packet;
mod wire;

use crate::mutate::{self, Mutator};
use crate::Outcome;
use rand::rngs::SmallRng;
use rand::Rng;
use std::fmt;

/// A decoder (or a node) under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `mesh_proto::demux::classify`: the first bytes of every datagram on the node's socket.
    Demux,
    /// `mesh_proto::relay::decode` and `set_key`: relay frames (QUIC datagrams).
    RelayFrame,
    /// `mesh_proto::relay::Reassembly`: runs of fragments, with time passing.
    RelayReassembly,
    /// `RelayClientMsg::decode` / `RelayServerMsg::decode`: admission at a standalone relay.
    RelaySession,
    /// A relay's admission check: `RelayClientMsg::decode`, then `TicketKey::verify`.
    RelayTicket,
    /// `mesh_proto::control::decode_client`: what a node sends the controller.
    ControlClient,
    /// `mesh_proto::control::decode_server`: what the controller sends a node.
    ControlServer,
    /// `JoinToken::from_str`.
    Token,
    /// `PublicKey::from_str` and `hex::decode`.
    Key,
    /// `mesh_core::packet` and `pmtu::frag_needed`: views of IP packets.
    IpPacket,
    /// `mesh_proto::tunnel::parse` (re-exported as `mesh_core::pmtu::parse`): in-tunnel probe,
    /// ack and birthday messages.
    Pmtu,
    /// A whole `mesh_core::Node`: datagrams, relayed messages, TUN packets, timer ticks.
    Node,
    /// Two nodes with a WireGuard session: mutated inner packets through the tunnel.
    Tunnel,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 13] = [
        Target::Demux,
        Target::RelayFrame,
        Target::RelayReassembly,
        Target::RelaySession,
        Target::RelayTicket,
        Target::ControlClient,
        Target::ControlServer,
        Target::Token,
        Target::Key,
        Target::IpPacket,
        Target::Pmtu,
        Target::Node,
        Target::Tunnel,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Demux => "demux",
            Target::RelayFrame => "relay_frame",
            Target::RelayReassembly => "relay_reassembly",
            Target::RelaySession => "relay_session",
            Target::RelayTicket => "relay_ticket",
            Target::ControlClient => "control_client",
            Target::ControlServer => "control_server",
            Target::Token => "token",
            Target::Key => "key",
            Target::IpPacket => "ip_packet",
            Target::Pmtu => "pmtu",
            Target::Node => "node",
            Target::Tunnel => "tunnel",
        }
    }

    /// The target of this name.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Inputs of the short pass `cargo test` runs: a few seconds each in a debug build.
    pub fn short_pass(self) -> u64 {
        match self {
            Target::RelayReassembly => 15_000,
            Target::Node | Target::Tunnel | Target::ControlServer | Target::RelayTicket => 30_000,
            _ => 50_000,
        }
    }

    pub(crate) fn harness(self) -> Box<dyn Harness> {
        match self {
            Target::Demux => Box::new(wire::demux()),
            Target::RelayFrame => Box::new(wire::relay_frame()),
            Target::RelayReassembly => Box::new(wire::Reassembly::new()),
            Target::RelaySession => Box::new(control::relay_session()),
            Target::RelayTicket => Box::new(control::RelayTicket::new()),
            Target::ControlClient => Box::new(control::client()),
            Target::ControlServer => Box::new(control::server()),
            Target::Token => Box::new(wire::Token::new()),
            Target::Key => Box::new(wire::key()),
            Target::IpPacket => Box::new(packet::ip_packet()),
            Target::Pmtu => Box::new(packet::pmtu()),
            Target::Node => Box::new(node::Single::new()),
            Target::Tunnel => Box::new(node::Tunnel::new()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One step of an input: what to do (target-specific) with which bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub op: u8,
    pub bytes: Vec<u8>,
}

/// The steps of one input, as text: one line per step.
pub(crate) fn describe(case: &[Step]) -> String {
    case.iter()
        .map(|s| format!("op {} {}", s.op, mesh_proto::hex::encode(&s.bytes)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A target's inputs and how it runs them.
pub(crate) trait Harness {
    /// The steps of one input, from `rng` only (never from the state).
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step>;
    /// Runs one input. Panics on a broken invariant.
    fn execute(&mut self, case: &[Step]) -> Outcome;
    /// The state starts over every this many inputs (stateless targets: never).
    fn epoch(&self) -> u64 {
        u64::MAX
    }
    /// Starts the state over for epoch `epoch`.
    fn reset(&mut self, _epoch: u64) {}
    /// The real messages the inputs come from.
    fn corpus(&self) -> Vec<Vec<u8>>;
}

/// A stateless decoder of single inputs: mutated corpus entries in, an outcome out.
pub(crate) struct Decoder {
    corpus: Vec<Vec<u8>>,
    max_len: usize,
    /// Also mutate the parsed JSON tree (half the inputs).
    json: bool,
    decode: fn(&[u8]) -> Outcome,
}

impl Decoder {
    pub(crate) fn new(
        name: &str,
        mut corpus: Vec<Vec<u8>>,
        max_len: usize,
        decode: fn(&[u8]) -> Outcome,
    ) -> Decoder {
        corpus.extend(committed(name));
        Decoder {
            corpus,
            max_len,
            json: false,
            decode,
        }
    }

    pub(crate) fn json(mut self) -> Decoder {
        self.json = true;
        self
    }
}

impl Harness for Decoder {
    fn generate(&self, rng: &mut SmallRng) -> Vec<Step> {
        let bytes = if self.json {
            json_input(rng, &self.corpus, self.max_len)
        } else {
            Mutator::new(&self.corpus, self.max_len).input(rng)
        };
        vec![Step { op: 0, bytes }]
    }

    fn execute(&mut self, case: &[Step]) -> Outcome {
        case.first()
            .map_or(Outcome::new("empty"), |s| (self.decode)(&s.bytes))
    }

    fn corpus(&self) -> Vec<Vec<u8>> {
        self.corpus.clone()
    }
}

/// An input for a JSON decoder: half the time an edit of the tree, sometimes with byte edits
/// on top; otherwise byte edits only.
pub(crate) fn json_input(rng: &mut SmallRng, corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let m = Mutator::new(corpus, max_len);
    if rng.gen() {
        return m.input(rng);
    }
    let base = m.pick(rng);
    let mut bytes = mutate::json::mutate(rng, &base, corpus).unwrap_or(base);
    if rng.gen_range(0..4) == 0 {
        m.mutate(rng, &mut bytes);
    }
    bytes
}

/// Files under `corpus/<name>/` in this crate's directory (inputs worth keeping: other
/// versions' messages, past crashes). Missing directory: none.
pub(crate) fn committed(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Asserts `cond`, naming a broken invariant (a panic the fuzzer records like any other).
#[track_caller]
pub(crate) fn check(cond: bool, what: &str) {
    assert!(cond, "invariant broken: {what}");
}
