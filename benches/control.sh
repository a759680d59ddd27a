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
#   CONTROL_REPLICAS  controllers (default 1: one on SQLite). 2 or more: that many
#                     controllers on ports CTL_PORT, CTL_PORT+1, ... sharing one
#                     PostgreSQL (Debian's server, started here in the work directory,
#                     as the postgres user when run as root; installed when missing and
#                     run as root), the nodes spread over them in turn. The RSS and CPU
#                     columns are then the first controller's; the RSS of each is
#                     printed after the table.
#   PG_PORT           PostgreSQL's TCP port on 127.0.0.1 (default 15432)
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
CONTROL_REPLICAS=${CONTROL_REPLICAS:-1}
PG_PORT=${PG_PORT:-15432}

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
[[ $CONTROL_REPLICAS =~ ^[1-9]$ ]] || die "CONTROL_REPLICAS must be 1 to 9"

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
chmod 0755 "$WORK"
CTL_PIDS=()
CTL_PID=
stop_pid() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_controller() {
    for pid in "${CTL_PIDS[@]}"; do
        stop_pid "$pid"
    done
    CTL_PIDS=()
    CTL_PID=
}
PG_PID=
stop_postgres() {
    if [[ -n $PG_PID ]]; then
        # SIGINT: PostgreSQL's fast shutdown.
        kill -INT "$PG_PID" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$PG_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$PG_PID" 2>/dev/null || true
        PG_PID=
    fi
}
cleanup() {
    stop_controller
    stop_postgres
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

# PostgreSQL for several controllers: Debian's server, a cluster of our own in $WORK.
DB_ARGS=()
if ((CONTROL_REPLICAS > 1)); then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [[ -z $PG_BIN ]]; then
        if [[ $EUID -ne 0 ]] || ! apt_ensure postgresql; then
            die "CONTROL_REPLICAS > 1 needs PostgreSQL: run as root to have it installed, or apt-get install postgresql"
        fi
        PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    AS_PG=()
    mkdir -p "$WORK/pg"
    if [[ $EUID -eq 0 ]]; then
        # PostgreSQL refuses to run as root.
        chown postgres: "$WORK/pg"
        AS_PG=(setpriv --reuid=postgres --regid=postgres --clear-groups --)
    fi
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg/data" -U mesh --auth=trust --no-locale \
        --encoding=UTF8 >"$WORK/pg-initdb.log" 2>&1 || { cat "$WORK/pg-initdb.log" >&2; die "initdb failed"; }
    "${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories="$WORK/pg" -c max_connections=200 >"$WORK/pg.log" 2>&1 &
    PG_PID=$!
    for _ in $(seq 100); do
        "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
        sleep 0.1
    done
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { cat "$WORK/pg.log" >&2; die "PostgreSQL did not start"; }
fi

# Starts controller $2 (0-based) for run $1; its state dir is $WORK/state-$1-$2.
start_controller() {
    local n=$1 i=$2 port=$((CTL_PORT + $2)) state="$WORK/state-$1-$2"
    local key=()
    ((i > 0)) && key=(--key-file "$WORK/state-$n-0/controller.key")
    udp_bound "$port" && die "UDP port $port is already in use (set CTL_PORT)"
    "$CTL" --state-dir "$state" "${DB_ARGS[@]}" "${key[@]}" serve --listen "127.0.0.1:$port" \
        --observer-listen off --listen-tcp off >"$WORK/serve-$n-$i.log" 2>&1 &
    local pid=$!
    CTL_PIDS+=("$pid")
    for _ in $(seq 100); do
        udp_bound "$port" && break
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/serve-$n-$i.log" >&2; die "controller $i exited"; }
        sleep 0.1
    done
    udp_bound "$port" || die "controller $i did not bind UDP $port"
}

ROWS=()
RSS_LINES=()
for n in $LOAD_NODES; do
    if ((CONTROL_REPLICAS > 1)); then
        "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U mesh "load_$n" || die "createdb failed"
        DB_ARGS=(--database "postgres://mesh@127.0.0.1:$PG_PORT/load_$n")
    fi
    CONTROLLER_ARGS=()
    for ((i = 0; i < CONTROL_REPLICAS; i++)); do
        start_controller "$n" "$i"
        CONTROLLER_ARGS+=(--controller "127.0.0.1:$((CTL_PORT + i))")
    done
    CTL_PID=${CTL_PIDS[0]}
    state="$WORK/state-$n-0"
    # The state dir exists once `serve` runs; the admin commands share its database.
    "$CTL" --state-dir "$state" "${DB_ARGS[@]}" network create load --cidr 100.64.0.0/16 >/dev/null 2>&1 ||
        die "network create failed"
    "$CTL" --state-dir "$state" "${DB_ARGS[@]}" token create load --reusable --expires 1h \
        "${CONTROLLER_ARGS[@]}" --controller-tcp none >"$state/token" 2>/dev/null ||
        die "token create failed"

    echo "N=$n: joining..." >&2
    # shellcheck disable=SC2086 # LOAD_ARGS is a list of arguments
    json=$("$LOAD" --token-file "$state/token" --nodes "$n" --concurrency "$LOAD_CONCURRENCY" \
        "${CONTROLLER_ARGS[@]}" --controller-pid "$CTL_PID" --idle "$LOAD_IDLE" --json $LOAD_ARGS) || {
        tail -20 "$WORK/serve-$n-0.log" >&2
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
    if ((CONTROL_REPLICAS > 1)); then
        rss=()
        for pid in "${CTL_PIDS[@]}"; do
            rss+=("$(awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status") MiB")
        done
        RSS_LINES+=("N=$n: RSS of the $CONTROL_REPLICAS controllers after the run: ${rss[*]}")
    fi
    stop_controller
    rm -rf "$WORK"/state-"$n"-*
done

echo
echo "| nodes | joined | join span s | joins/s | all know all after s | told of +1 in 10 s | +1 join delay p50/p99/max ms | bytes/node for +1 | leave delay p50/p99/max ms | ctl RSS MiB | ctl CPU s (joins until quiet) | ctl idle CPU % |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if ((CONTROL_REPLICAS > 1)); then
    echo
    echo "$CONTROL_REPLICAS controllers on one PostgreSQL; RSS and CPU columns: the first controller's"
    printf '%s\n' "${RSS_LINES[@]}"
fi
