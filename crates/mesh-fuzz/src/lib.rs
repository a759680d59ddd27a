//! Fuzzing of every decoder of untrusted bytes in mesh, on stable Rust.
//!
//! Each [`Target`] starts from a corpus of real messages made by the project's own encoders
//! (control and relay-session messages, relay frames of several sizes, join tokens, keys, relay
//! tickets, WireGuard handshakes and data from two real `mesh_core::Node`s, in-tunnel messages),
//! plus any files under `crates/mesh-fuzz/corpus/<target>/`, and feeds the decoder seeded
//! mutations of them ([`mutate`]: bit flips, byte sets, interesting values, truncation,
//! extension, splicing, length-field tweaks; for JSON messages also edits of the parsed tree).
//! Every input runs under `catch_unwind`; a panic is recorded with the seed, the iteration and
//! the input in hex, and [`replay`] runs that iteration again.
//!
//! Besides "never panics", targets check what must hold of what a decoder accepts: it encodes
//! back to something that decodes to the same value; a relayed message that was sent whole is
//! reassembled whole; a ticket verifies only as issued; a packet a node writes to its TUN device
//! comes from the peer's overlay address.
//!
//! Stateful decoders get sequences: the relay `Reassembly` a run of frames with time passing; a
//! whole `Node` datagrams from its peer and from strangers, relayed messages, TUN packets and
//! timer ticks (it must count and drop, never panic); and a pair of nodes carries mutated inner
//! packets through a real WireGuard session, so the in-tunnel messages (path MTU probes, pings,
//! birthday joins) reach the code behind decryption.
//!
//! Not covered: the Noise channel of `mesh-control` reads its length-prefixed frames straight
//! from quinn streams (no pure decoder to call), and the agent's local API requests are parsed
//! inside the `mesh` binary.
//!
//! Run a short pass of every target with `cargo test -p mesh-fuzz`, a long one with
//! `cargo run --release -p mesh-fuzz -- --target all --iterations 10000000 [--seed N]`, and one
//! failing iteration again with `--replay ITERATION` (same target and seed).

pub mod mutate;
mod targets;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

pub use targets::Target;

/// What became of one input: a kind ("ok", "malformed", a drop counter ...) and a detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Outcome {
    /// The broad result.
    pub kind: &'static str,
    /// A finer one (an error's field, the kind of input), or empty.
    pub detail: &'static str,
}

impl Outcome {
    /// An outcome without detail.
    pub const fn new(kind: &'static str) -> Outcome {
        Outcome { kind, detail: "" }
    }

    /// An outcome with detail.
    pub const fn with(kind: &'static str, detail: &'static str) -> Outcome {
        Outcome { kind, detail }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.kind)
        } else {
            write!(f, "{}/{}", self.kind, self.detail)
        }
    }
}

/// One input that panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The target.
    pub target: Target,
    /// The run's seed.
    pub seed: u64,
    /// The iteration; with the seed it names the input.
    pub iteration: u64,
    /// The panic message and location.
    pub message: String,
    /// The input: one line per step, `op <n> <hex bytes>`.
    pub input: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "PANIC in {} at iteration {} (seed {}): {}",
            self.target, self.iteration, self.seed, self.message
        )?;
        writeln!(f, "input:\n{}", self.input)?;
        write!(
            f,
            "replay: cargo run --release -p mesh-fuzz -- --target {} --seed {} --replay {}",
            self.target, self.seed, self.iteration
        )
    }
}

/// Failures kept per run (the count goes on).
const MAX_FAILURES: usize = 8;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The target.
    pub target: Target,
    /// The seed.
    pub seed: u64,
    /// Inputs run.
    pub inputs: u64,
    /// How many inputs ended in each outcome.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Inputs that panicked.
    pub panics: u64,
    /// The first few of them.
    pub failures: Vec<Failure>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Stats {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `iterations` inputs of `target` from `seed`.
pub fn run(target: Target, seed: u64, iterations: u64) -> Stats {
    run_with_progress(target, seed, iterations, Duration::MAX, |_| {})
}

/// Like [`run`], calling `progress` with the stats so far about every `every`.
pub fn run_with_progress(
    target: Target,
    seed: u64,
    iterations: u64,
    every: Duration,
    mut progress: impl FnMut(&Stats),
) -> Stats {
    install_panic_capture();
    let started = Instant::now();
    let mut last_report = started;
    let mut stats = Stats {
        target,
        seed,
        inputs: 0,
        outcomes: BTreeMap::new(),
        panics: 0,
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut harness = target.harness();
    let epoch = harness.epoch().max(1);
    for i in 0..iterations {
        if i % epoch == 0 {
            harness.reset(i / epoch);
        }
        match one(harness.as_mut(), seed, i) {
            Ok(outcome) => *stats.outcomes.entry(outcome).or_insert(0) += 1,
            Err((message, input)) => {
                stats.panics += 1;
                if stats.failures.len() < MAX_FAILURES {
                    stats.failures.push(Failure {
                        target,
                        seed,
                        iteration: i,
                        message,
                        input,
                    });
                }
                // The state may be half-updated: start over.
                harness.reset(i / epoch);
            }
        }
        stats.inputs += 1;
        if i % 512 == 0 && last_report.elapsed() >= every {
            last_report = Instant::now();
            stats.elapsed = started.elapsed();
            progress(&stats);
        }
    }
    stats.elapsed = started.elapsed();
    stats
}

/// What [`replay`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The input of the iteration, as in [`Failure::input`].
    pub input: String,
    /// Its outcome, or the panic message.
    pub result: Result<Outcome, String>,
}

/// Runs one iteration of a run again: the state of stateful targets is rebuilt by running the
/// iterations before it since the start of its epoch (stateful targets depend on boringtun's
/// wall clock too, so a replay is close to, not always exactly, the original run).
pub fn replay(target: Target, seed: u64, iteration: u64) -> Replay {
    install_panic_capture();
    let mut harness = target.harness();
    let epoch = harness.epoch().max(1);
    harness.reset(iteration / epoch);
    for i in iteration - iteration % epoch..iteration {
        let _ = one(harness.as_mut(), seed, i);
    }
    let mut rng = case_rng(seed, iteration);
    let case = harness.generate(&mut rng);
    let input = targets::describe(&case);
    let result = one(harness.as_mut(), seed, iteration).map_err(|(message, _)| message);
    Replay { input, result }
}

/// The inputs a target starts from, for a look at them (`mesh-fuzz --dump-corpus`).
pub fn corpus(target: Target) -> Vec<Vec<u8>> {
    target.harness().corpus()
}

/// The generator of iteration `i`: every input depends on the seed and its iteration only.
fn case_rng(seed: u64, i: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed.rotate_left(32) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Generates and runs one input, catching a panic: `Err((message, input))`.
fn one(harness: &mut dyn targets::Harness, seed: u64, i: u64) -> Result<Outcome, (String, String)> {
    let mut rng = case_rng(seed, i);
    let case = RefCell::new(Vec::new());
    CAPTURING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        *case.borrow_mut() = harness.generate(&mut rng);
        harness.execute(&case.borrow())
    }));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        let message = CAPTURED
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| "panic without a message".to_owned());
        let input = case
            .try_borrow()
            .map(|c| targets::describe(&c))
            .unwrap_or_default();
        (message, input)
    })
}

thread_local! {
    /// Whether this thread is running an input (its panics are captured, not printed).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The last captured panic message.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs, once per process, a panic hook that records the message of a panic inside an
/// input instead of printing it; other panics go to the previous hook.
fn install_panic_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(|c| c.get()) {
                let backtrace = std::backtrace::Backtrace::capture();
                let text = match backtrace.status() {
                    std::backtrace::BacktraceStatus::Captured => format!("{info}\n{backtrace}"),
                    _ => info.to_string(),
                };
                CAPTURED.with(|c| *c.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
}
