//! The mesh controller.
//!
//! It admits nodes (join tokens), gives each node key a stable overlay address, and keeps every
//! connected node's peer list current.
//!
//! - [`store`]: the state and its rules (tokens, IPAM, membership) over SQLite; takes wall time
//!   as a parameter, does no network I/O.
//! - [`netmap`]: pure functions that turn peer lists into per-node deltas.
//! - [`db`]: a store on a thread of its own, for the async parts (no SQLite call blocks a
//!   tokio worker).
//! - [`server`]: the tokio/quinn driver (Noise channel per node, hub that pushes deltas).
//! - [`state`]: the state directory (controller key, database, listen address).
//! - [`metrics`]: the opt-in Prometheus endpoint.

pub mod db;
pub mod metrics;
pub mod netmap;
pub mod server;
pub mod state;
pub mod store;
