#!/usr/bin/env bash
#
# An agent with many peers: memory and idle CPU of one real `mesh` agent
# (release build) joined to a network where N simulated nodes from
# `mesh-control-load` already sit. See benches/README.md, "An agent with many
# peers". Needs root (the agent opens a TUN device); everything runs inside one
# network namespace made here, on its loopback.
#
# For each N: a fresh controller and network; the load tool joins N nodes and
# keeps them connected; then one agent joins with `mesh join`. The simulated
# nodes never answer WireGuard, so to the agent they are peers that stay
# offline (the case of a node that joins a large network and talks to few).
# Prints a markdown table: the agent's resident memory at 25 s and at the end,
# and its CPU (% of one core) over two windows: 25-45 s after it started (its
# first handshakes toward every peer are still being retried) and the last
# 30 s of AGENT_RUN (all retries over; what an idle agent costs for good).
#
# Environment:
#   AGENT_PEERS   space-separated simulated node counts (default "2 200 1000")
#   AGENT_RUN     seconds the agent runs (default 150; at least 60)
#   AGENT_WRAP    a command the agent runs under, e.g. "heaptrack -o /tmp/agent"
#                 (then the RSS and CPU columns are the wrapper's process)
#   CTL_PORT      UDP port of the controller on the namespace's 127.0.0.1
#                 (default 17443)
#   MESH_BIN_DIR  directory holding mesh, mesh-controller and mesh-control-load
#                 (default: build this tree with cargo, release)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

AGENT_PEERS=${AGENT_PEERS:-2 200 1000}
AGENT_RUN=${AGENT_RUN:-150}
AGENT_WRAP=${AGENT_WRAP:-}
CTL_PORT=${CTL_PORT:-17443}

die() {
    echo "agent_peers.sh: $*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "needs root: the agent opens a TUN device in a namespace made here"
for n in $AGENT_PEERS; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "AGENT_PEERS must hold positive integers (got '$n')"
done
[[ $AGENT_RUN =~ ^[0-9]+$ ]] && ((AGENT_RUN >= 60)) || die "AGENT_RUN must be a number of seconds, at least 60"
command -v jq >/dev/null || die "needs jq: apt-get install jq"

if [[ -n ${MESH_BIN_DIR:-} ]]; then
    BIN=$MESH_BIN_DIR
else
    echo "building release binaries..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p mesh-controller -p mesh-agent &&
        cargo build --release --quiet -p mesh-benches --bin mesh-control-load)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
for b in mesh mesh-controller mesh-control-load; do
    [[ -x $BIN/$b ]] || die "no $BIN/$b"
done

NS="meshbench-ap-$$"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mesh-agent-peers.XXXXXX")
PIDS=()
# TERM to each process and its children (a wrapper's program), KILL after 5 s.
stop_all() {
    for pid in "${PIDS[@]}"; do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        pkill -KILL -P "$pid" 2>/dev/null || true
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
# (Background processes are started with `ip netns exec` itself, so that $! is their PID.)
in_ns() { ip netns exec "$NS" "$@"; }

ticks=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
pct() { awk -v d="$1" -v s="$2" -v t="$ticks" 'BEGIN { printf "%.2f", 100 * d / t / s }'; }

ROWS=()
for n in $AGENT_PEERS; do
    state="$WORK/ctl-$n"
    ip netns exec "$NS" "$BIN/mesh-controller" --state-dir "$state" serve --listen "127.0.0.1:$CTL_PORT" \
        --observer-listen off --listen-tcp off >"$WORK/serve-$n.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 100); do
        [[ -e $state/controller.key ]] && in_ns grep -q ":$(printf '%04X' "$CTL_PORT") " /proc/net/udp && break
        sleep 0.1
    done
    in_ns "$BIN/mesh-controller" --state-dir "$state" network create load --cidr 100.64.0.0/16 >/dev/null ||
        die "network create failed"
    in_ns "$BIN/mesh-controller" --state-dir "$state" token create load --reusable --expires 1h \
        --controller "127.0.0.1:$CTL_PORT" --controller-tcp none >"$WORK/token-$n" ||
        die "token create failed"
    chmod 0600 "$WORK/token-$n"

    echo "N=$n: joining the simulated nodes..." >&2
    ip netns exec "$NS" "$BIN/mesh-control-load" --token-file "$WORK/token-$n" --nodes "$n" \
        --idle $((AGENT_RUN + 120)) >"$WORK/load-$n.log" 2>&1 &
    load=$!
    PIDS+=("$load")
    # Joined once the count holds still for 5 s (under load a few joins time out; the
    # agent's peer count is in the table).
    joined=0 still=0
    for _ in $(seq 1200); do
        now=$(in_ns "$BIN/mesh-controller" --state-dir "$state" node list load --json 2>/dev/null | jq length)
        if ((now > 0 && now == joined)); then still=$((still + 1)); else still=0; fi
        joined=$now
        ((still >= 10)) && break
        kill -0 "$load" 2>/dev/null || { cat "$WORK/load-$n.log" >&2; die "mesh-control-load exited"; }
        sleep 0.5
    done
    ((joined * 10 >= n * 9)) || die "only $joined of $n simulated nodes joined"

    echo "N=$n: the agent joins and runs for $AGENT_RUN s..." >&2
    # Joined first, then run with `mesh up`: the daemon is the process started here (a
    # wrapper such as heaptrack follows it; `mesh join` would exec itself into `mesh up`).
    in_ns "$BIN/mesh" --state-dir "$WORK/agent-$n" join --no-daemon --token-file "$WORK/token-$n" \
        --name probe >"$WORK/agent-$n.log" 2>&1 || { cat "$WORK/agent-$n.log" >&2; die "mesh join failed"; }
    # shellcheck disable=SC2086 # AGENT_WRAP is a command line
    ip netns exec "$NS" $AGENT_WRAP "$BIN/mesh" --state-dir "$WORK/agent-$n" up --interface meshb0 \
        >>"$WORK/agent-$n.log" 2>&1 &
    agent=$!
    PIDS+=("$agent")
    start=$(date +%s.%N)
    at() { sleep "$(awk -v s="$start" -v t="$1" -v now="$(date +%s.%N)" 'BEGIN { d = s + t - now; print (d > 0 ? d : 0) }')"; }
    at 25
    kill -0 "$agent" 2>/dev/null || { cat "$WORK/agent-$n.log" >&2; die "the agent exited"; }
    peers=$(in_ns "$BIN/mesh" --state-dir "$WORK/agent-$n" status --json | jq '.peers | length')
    rss25=$(rss_mib "$agent")
    grep -E '^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM|Threads)' "/proc/$agent/status" | tr -s ' \t' ' ' | paste -sd, | sed "s/^/N=$n: agent at 25 s: /" >&2
    c0=$(cpu_ticks "$agent")
    at 45
    c1=$(cpu_ticks "$agent")
    at $((AGENT_RUN - 30))
    c2=$(cpu_ticks "$agent")
    at "$AGENT_RUN"
    c3=$(cpu_ticks "$agent")
    rss_end=$(rss_mib "$agent")
    ROWS+=("| $n | $peers | $rss25 | $rss_end | $(pct $((c1 - c0)) 20) | $(pct $((c3 - c2)) 30) |")
    echo "${ROWS[-1]}" >&2
    # The agent first, by its command line (under a wrapper, TERM to the wrapper's children
    # would also stop the wrapper's own helpers), and let a wrapper finish its output.
    pkill -TERM -f -- "--state-dir $WORK/agent-$n up" || true
    for _ in $(seq 300); do
        kill -0 "$agent" 2>/dev/null || break
        sleep 0.1
    done
    stop_all
done

echo
echo "| simulated nodes | agent's peers | agent RSS MiB at 25 s | at $AGENT_RUN s | agent CPU % 25-45 s | CPU % $((AGENT_RUN - 30))-$AGENT_RUN s |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
