//! Runs data-path rounds for an instruction count: `valgrind --tool=callgrind
//! target/release/mesh-datapath-count mesh 20000` (or `boringtun`, or `wg`: mesh's own WireGuard sessions), twice with different
//! round counts; the difference over the difference in rounds is the instructions per packet,
//! free of the set-up and of whatever else the machine is doing.

use mesh_benches::{Mesh, Raw, Wg};

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let rounds: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let mut sum = 0usize;
    match which.as_str() {
        "boringtun" => {
            let mut raw = Raw::default();
            for _ in 0..rounds {
                sum += raw.round();
            }
        }
        "wg" => {
            let mut wg = Wg::default();
            for _ in 0..rounds {
                sum += wg.round();
            }
        }
        "mesh" => {
            let mut mesh = Mesh::default();
            for _ in 0..rounds {
                sum += mesh.round();
            }
        }
        _ => {
            eprintln!("usage: mesh-datapath-count boringtun|wg|mesh [rounds]");
            std::process::exit(2);
        }
    }
    std::hint::black_box(sum);
}
