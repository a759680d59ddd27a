#!/usr/bin/env bash
# NAT traversal over trials: every NAT pair kind of the e2e lab, NAT_TRIALS times from fresh
# (default 10), with the share of trials that went direct and the time to direct (median,
# 90th percentile). It is the e2e test `tests/tests/nat_trials.rs` (which CI runs with one
# trial per kind) run longer, on release binaries, with the pairs whose plain Linux gateways
# share one segment with the other side's router added (measured, not asserted).
#
#   sudo benches/nat.sh                  # 10 trials per pair kind
#   sudo NAT_TRIALS=30 benches/nat.sh
#
# Needs root (namespaces, TUN, nftables) and a Debian machine; installs nothing itself beyond
# what ./test.sh installs (run that once first).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $(id -u) -ne 0 ]]; then
    echo "nat.sh: the lab creates network namespaces; run as root" >&2
    exit 1
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
echo "== building mesh (release)"
(cd "$ROOT" && cargo build --release --bins --quiet)
echo "== ${NAT_TRIALS:-10} trials per pair kind"
cd "$ROOT/tests"
MESH_NAT_TRIALS="${NAT_TRIALS:-10}" MESH_NAT_TRIALS_LINUX=1 MESH_BIN_DIR="$TARGET_DIR/release" \
    cargo test --release --quiet --test nat_trials -- --nocapture 2>&1 |
    grep -v -e '^running ' -e '^$'
