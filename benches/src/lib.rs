//! Microbenchmarks live in `benches/datapath.rs`; the end-to-end throughput bench is
//! `benches/tunnel.sh`.
