//! The fuzz pass CI runs (`cargo test --workspace`), and a longer one by hand.

use mesh_fuzz::{run, Stats, Target};
use std::time::Instant;

/// A fixed seed, so that a CI failure names an input anybody can replay.
const SEED: u64 = 0x6d65_7368;

fn assert_clean(s: &Stats) {
    let failures: Vec<String> = s.failures.iter().map(|f| f.to_string()).collect();
    assert_eq!(s.panics, 0, "{}", failures.join("\n\n"));
    // A corpus of real messages reaches more than one outcome (something accepted, something
    // refused); a single outcome means the inputs never got past the first check.
    assert!(s.outcomes.len() >= 2, "{}: only {:?}", s.target, s.outcomes);
}

#[test]
fn short_pass_of_every_target() {
    let started = Instant::now();
    for target in Target::ALL {
        let s = run(target, SEED, target.short_pass());
        assert_eq!(s.inputs, target.short_pass());
        assert_clean(&s);
        eprintln!(
            "{target}: {} inputs in {:.1}s, {} outcomes",
            s.inputs,
            s.elapsed.as_secs_f64(),
            s.outcomes.len()
        );
    }
    eprintln!("short pass: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn same_seed_same_run() {
    for target in [
        Target::RelayFrame,
        Target::ControlClient,
        Target::RelayReassembly,
    ] {
        let a = run(target, 3, 2000);
        let b = run(target, 3, 2000);
        assert_eq!(a.outcomes, b.outcomes, "{target}");
    }
}

/// A longer pass: `cargo test --release -p mesh-fuzz -- --ignored` (the binary reports more).
#[test]
#[ignore]
fn long_pass_of_every_target() {
    for target in Target::ALL {
        let s = run(target, SEED ^ 1, 1_000_000);
        assert_clean(&s);
    }
}
