//! Per-packet cost of mesh's data path against raw boringtun, in the same run.
//!
//! - `boringtun`: two `Tunn`s with an established session; encapsulate on one side, decapsulate
//!   on the other. The baseline.
//! - `mesh_wg`: mesh's own WireGuard sessions (`mesh-wg`): a packet sealed in place behind room
//!   for the header, opened in place on the other side. What the node's data path would cost
//!   in WireGuard once it seals and opens data messages itself.
//! - `mesh_core`: two `mesh_core::Node`s; a TUN packet goes in on one side (routing, encryption,
//!   transmit queue) and comes out of the other (demux by index, decryption, source check).
//!
//! The ratio mesh_core / boringtun is the cost of mesh's own work around WireGuard. The same
//! rounds, counted in instructions instead of time: `mesh-datapath-count` under callgrind.
//!
//! `burst_46x1400B`: the sending node alone, a TUN read's worth of packets in and one batch
//! out. `sealed_in_loop`: the node encrypts (the loop's whole cost without a sealing thread);
//! `loop_share_deferred`: the node leaves encryption to the driver (what the loop still pays);
//! `seal_thread_share`: sealing that batch (what the agent's sealing thread pays).
//! The receiving side, a burst of datagrams into a node and out as TUN packets:
//! `opened_in_loop` (the loop's whole cost without an opening thread), `opened_deferred_all`
//! (set aside, opened and taken back, all on one thread), `open_thread_share` (what the
//! opening thread pays); the loop's share with the thread is the second minus the third.

use criterion::BatchSize;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_benches::{Burst, Mesh, Raw, Receive, Wg, BURST, PAYLOAD};
use std::cell::RefCell;

fn datapath(c: &mut Criterion) {
    let mut g = c.benchmark_group("one_packet_1400B");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut raw = Raw::default();
    g.bench_function("boringtun", |bench| bench.iter(|| raw.round()));
    let mut wg = Wg::default();
    g.bench_function("mesh_wg", |bench| bench.iter(|| wg.round()));
    let mut mesh = Mesh::default();
    g.bench_function("mesh_core", |bench| bench.iter(|| mesh.round()));
    g.finish();
    let mut g = c.benchmark_group(format!("burst_{BURST}x{PAYLOAD}B"));
    g.throughput(Throughput::Bytes((BURST * PAYLOAD) as u64));
    let mut inline = Burst::new(false);
    g.bench_function("sealed_in_loop", |bench| bench.iter(|| inline.round(false)));
    let mut deferred = Burst::new(true);
    g.bench_function("loop_share_deferred", |bench| {
        bench.iter(|| deferred.round(false))
    });
    let mut sealer = Burst::new(true);
    g.bench_function("seal_thread_share", |bench| {
        bench.iter_batched(|| sealer.unsealed(), |u| u.seal(), BatchSize::SmallInput)
    });
    // (The sealed batches are dropped, not given back: setup makes more.)
    drop(sealer);
    // The receiving side: setup has A seal each round's burst (fresh counters).
    for (name, defer) in [("opened_in_loop", false), ("opened_deferred_all", true)] {
        let r = RefCell::new(Receive::new(defer));
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || r.borrow_mut().sealed(),
                |t| r.borrow_mut().round(t),
                BatchSize::SmallInput,
            )
        });
    }
    let r = RefCell::new(Receive::new(true));
    g.bench_function("open_thread_share", |bench| {
        bench.iter_batched(
            || {
                let t = r.borrow_mut().sealed();
                r.borrow_mut().unopened(t)
            },
            |u| u.open(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, datapath);
criterion_main!(benches);
