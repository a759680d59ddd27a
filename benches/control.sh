#!/usr/bin/env bash
#
# The control plane at scale: a real `mesh-controller serve` on loopback, and
# `mesh-control-load` joining N simulated nodes to it over the real protocol
# (QUIC, Noise, Join/Welcome, pushes). See benches/README.md, "Control plane
# at scale". No root needed; loopback only.
#
# For each N: a fresh controller in a temporary state dir, one network, one
# reusable token; N nodes join, 64 at a time; then one more joins and leaves.
# Prints a markdown table: join time and rate, how long the N connected nodes
# took to hear of the extra node's join and leave (p50/p99/max after its
# Welcome or Leave), bytes pushed per node for that join, and the
# controller's resident memory after the joins, CPU seconds for them, and
# CPU % of one core while idle with all N connected.
#
# Environment:
#   LOAD_NODES        space-separated node counts (default "100 500 1000")
#   LOAD_CONCURRENCY  joins in flight (default 64)
#   LOAD_IDLE         seconds of idle measurement (default 10)
#   CTL_PORT          UDP port of the controller on 127.0.0.1 (default 17443)
#   MESH_BIN_DIR      directory holding mesh-controller and mesh-control-load
#                     (default: build this tree with cargo, release)
#   KEEP_JSON         file to append each run's JSON line to (default: none)
#   LOAD_ARGS         more arguments for mesh-control-load, e.g. "--heartbeat 0"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# For apt_ensure (installs jq when run as root, as tunnel.sh does).
# shellcheck source=benches/lib-netns.sh
. "$HERE/lib-netns.sh"

LOAD_NODES=${LOAD_NODES:-100 500 1000}
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-64}
LOAD_IDLE=${LOAD_IDLE:-10}
CTL_PORT=${CTL_PORT:-17443}
KEEP_JSON=${KEEP_JSON:-}
LOAD_ARGS=${LOAD_ARGS:-}

die() {
    echo "control.sh: $*" >&2
    exit 1
}

command -v jq >/dev/null || { [[ $EUID -eq 0 ]] && apt_ensure jq; } ||
    die "needs jq: run as root to have it installed, or apt-get install jq"
for n in $LOAD_NODES; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "LOAD_NODES must hold positive integers (got '$n')"
done
[[ $LOAD_IDLE =~ ^[0-9]+$ ]] || die "LOAD_IDLE must be a non-negative integer"

if [[ -n ${MESH_BIN_DIR:-} ]]; then
    BIN=$MESH_BIN_DIR
else
    echo "building release binaries..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p mesh-controller &&
        cargo build --release --quiet -p mesh-benches --bin mesh-control-load)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
CTL="$BIN/mesh-controller"
LOAD="$BIN/mesh-control-load"
[[ -x $CTL ]] || die "no $CTL"
[[ -x $LOAD ]] || die "no $LOAD"

# Connections take no descriptors on either side (UDP), but be generous.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mesh-control-bench.XXXXXX")
CTL_PID=
stop_controller() {
    if [[ -n $CTL_PID ]]; then
        kill "$CTL_PID" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$CTL_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$CTL_PID" 2>/dev/null || true
        wait "$CTL_PID" 2>/dev/null || true
        CTL_PID=
    fi
}
cleanup() {
    stop_controller
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

udp_bound() {
    # /proc/net/udp lists local ports in hex.
    local hex
    hex=$(printf '%04X' "$1")
    grep -q ":$hex " /proc/net/udp
}

ROWS=()
for n in $LOAD_NODES; do
    state="$WORK/state-$n"
    udp_bound "$CTL_PORT" && die "UDP port $CTL_PORT is already in use (set CTL_PORT)"
    "$CTL" --state-dir "$state" serve --listen "127.0.0.1:$CTL_PORT" \
        --observer-listen off --listen-tcp off >"$WORK/serve-$n.log" 2>&1 &
    CTL_PID=$!
    for _ in $(seq 100); do
        udp_bound "$CTL_PORT" && break
        kill -0 "$CTL_PID" 2>/dev/null || { cat "$WORK/serve-$n.log" >&2; die "the controller exited"; }
        sleep 0.1
    done
    udp_bound "$CTL_PORT" || die "the controller did not bind UDP $CTL_PORT"
    # The state dir exists once `serve` runs; the admin commands share its database.
    "$CTL" --state-dir "$state" network create load --cidr 100.64.0.0/16 >/dev/null 2>&1 ||
        die "network create failed"
    "$CTL" --state-dir "$state" token create load --reusable --expires 1h \
        --controller "127.0.0.1:$CTL_PORT" --controller-tcp none >"$state/token" 2>/dev/null ||
        die "token create failed"

    echo "N=$n: joining..." >&2
    # shellcheck disable=SC2086 # LOAD_ARGS is a list of arguments
    json=$("$LOAD" --token-file "$state/token" --nodes "$n" --concurrency "$LOAD_CONCURRENCY" \
        --controller-pid "$CTL_PID" --idle "$LOAD_IDLE" --json $LOAD_ARGS) || {
        tail -20 "$WORK/serve-$n.log" >&2
        die "mesh-control-load failed for N=$n"
    }
    [[ -n $KEEP_JSON ]] && echo "$json" >>"$KEEP_JSON"
    echo "$json" | jq -c . >&2
    ROWS+=("$(echo "$json" | jq -r '
        def r(x): (x * 10 | round) / 10;
        "| \(.nodes) | \(.joined) | \(r(.join_span_s)) | \(.joins_per_s | round) " +
        "| \(if .converged_s then r(.converged_s) else "no" end) " +
        "| \(.extra_join.within_10s)/\(.extra_join.nodes) " +
        "| \(r(.extra_join.p50_ms)) / \(r(.extra_join.p99_ms)) / \(r(.extra_join.max_ms)) " +
        "| \(.extra_join.bytes_per_node_mean) " +
        "| \(if .extra_leave then "\(r(.extra_leave.p50_ms)) / \(r(.extra_leave.p99_ms)) / \(r(.extra_leave.max_ms))" else "-" end) " +
        "| \(r(.controller_rss_mib)) | \(r(.controller_cpu_joins_s)) | \(r(.controller_idle_cpu_pct)) |"')")
    stop_controller
    rm -rf "$state"
done

echo
echo "| nodes | joined | join span s | joins/s | all know all after s | told of +1 in 10 s | +1 join delay p50/p99/max ms | bytes/node for +1 | leave delay p50/p99/max ms | ctl RSS MiB | ctl CPU s (joins until quiet) | ctl idle CPU % |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
