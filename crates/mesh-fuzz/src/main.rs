//! `mesh-fuzz`: runs the fuzz targets of this crate and prints what became of the inputs.
#![allow(clippy::print_stdout)]

use clap::Parser;
use mesh_fuzz::{Stats, Target};
use std::process::ExitCode;
use std::time::Duration;

/// Fuzzes mesh's decoders of untrusted bytes from a corpus of real messages.
#[derive(Parser)]
#[command(name = "mesh-fuzz")]
struct Args {
    /// Targets, comma-separated, or `all`: demux, relay_frame, relay_reassembly, relay_session,
    /// relay_ticket, control_client, control_server, token, key, ip_packet, pmtu, node, tunnel.
    #[arg(long, default_value = "all")]
    target: String,
    /// Inputs per target.
    #[arg(long, default_value_t = 100_000)]
    iterations: u64,
    /// Seed; with the target and an iteration it names an input.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    progress: u64,
    /// Runs this one iteration again (of the given target and seed) and prints its input.
    #[arg(long)]
    replay: Option<u64>,
    /// Writes each target's corpus to DIR/<target>/<n> and exits.
    #[arg(long, value_name = "DIR")]
    dump_corpus: Option<std::path::PathBuf>,
}

fn targets(spec: &str) -> Result<Vec<Target>, String> {
    if spec == "all" {
        return Ok(Target::ALL.to_vec());
    }
    spec.split(',')
        .map(|name| {
            Target::from_name(name.trim()).ok_or_else(|| {
                let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                format!("unknown target {name:?}; known: all, {}", names.join(", "))
            })
        })
        .collect()
}

fn summary(s: &Stats) -> String {
    let outcomes: Vec<String> = s.outcomes.iter().map(|(o, n)| format!("{o}={n}")).collect();
    format!(
        "{:<17} {:>11} inputs {:>10.0}/s {:>7.1}s  panics {}  outcomes {}: {}",
        s.target.name(),
        s.inputs,
        s.rate(),
        s.elapsed.as_secs_f64(),
        s.panics,
        s.outcomes.len(),
        outcomes.join(", ")
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    let targets = match targets(&args.target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mesh-fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.dump_corpus {
        for t in &targets {
            let d = dir.join(t.name());
            let written = std::fs::create_dir_all(&d).and_then(|()| {
                for (i, entry) in mesh_fuzz::corpus(*t).iter().enumerate() {
                    std::fs::write(d.join(format!("{i:04}")), entry)?;
                }
                Ok(())
            });
            if let Err(e) = written {
                eprintln!("mesh-fuzz: cannot write {}: {e}", d.display());
                return ExitCode::from(2);
            }
            println!("{}: corpus written to {}", t.name(), d.display());
        }
        return ExitCode::SUCCESS;
    }
    if let Some(iteration) = args.replay {
        let mut failed = false;
        for t in &targets {
            let r = mesh_fuzz::replay(*t, args.seed, iteration);
            println!(
                "{} seed {} iteration {iteration}\ninput:\n{}",
                t.name(),
                args.seed,
                r.input
            );
            match r.result {
                Ok(outcome) => println!("outcome: {outcome}"),
                Err(message) => {
                    println!("PANIC: {message}");
                    failed = true;
                }
            }
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    println!(
        "mesh-fuzz: {} target(s), {} inputs each, seed {}",
        targets.len(),
        args.iterations,
        args.seed
    );
    let mut all = Vec::new();
    for t in targets {
        let every = Duration::from_secs(args.progress.max(1));
        let stats = mesh_fuzz::run_with_progress(t, args.seed, args.iterations, every, |s| {
            println!(
                "  [{}] {}/{} inputs, {:.0}/s, {:.0}s, {} panics",
                s.target.name(),
                s.inputs,
                args.iterations,
                s.rate(),
                s.elapsed.as_secs_f64(),
                s.panics
            );
        });
        println!("{}", summary(&stats));
        for f in &stats.failures {
            println!("{f}");
        }
        all.push(stats);
    }
    println!("\nsummary (seed {}):", args.seed);
    for s in &all {
        println!("{}", summary(s));
    }
    let panics: u64 = all.iter().map(|s| s.panics).sum();
    if panics > 0 {
        println!("{panics} input(s) panicked");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
