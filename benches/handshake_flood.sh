#!/usr/bin/env bash
#
# A TCP stream between two mesh members while a stranger floods the
# receiver with WireGuard handshake initiations (valid mac1, random keys).
# See benches/README.md. Needs root; everything runs in throwaway network
# namespaces that are removed on exit.
#
# Environment:
#   BENCH_SECONDS   length of each iperf3 run in seconds (default 10)
#   ROUNDS          pairs of runs (without, then with the flood; default 3)
#   FLOOD_RATE      initiations per second, 0 = as fast as one core sends
#                   (default 40000)
#   FLOOD_DISTINCT  distinct initiations the flooder precomputes (default 4096)
#   MESH_BIN_DIR    directory holding `mesh` and `mesh-controller` to measure
#                   (default: build this tree with cargo, release)
#   FLOOD_BIN       the flood generator (default: built from this tree)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-netns.sh
. "$HERE/lib-netns.sh"

BENCH_SECONDS=${BENCH_SECONDS:-10}
ROUNDS=${ROUNDS:-3}
FLOOD_RATE=${FLOOD_RATE:-40000}
FLOOD_DISTINCT=${FLOOD_DISTINCT:-4096}
[[ $BENCH_SECONDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer (got '$BENCH_SECONDS')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
[[ $FLOOD_RATE =~ ^[0-9]+$ ]] || die "FLOOD_RATE must be a non-negative integer (got '$FLOOD_RATE')"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# Underlay (documentation range) and overlay (inside 100.64.0.0/10).
CTL_IP=192.0.2.1
A_IP=192.0.2.11
B_IP=192.0.2.12
X_IP=192.0.2.66
CTL_PORT=7443
MESH_PORT=51820
IPERF_PORT=5201

lib_on_exit() {
    if [[ $1 -eq 130 || $1 -eq 143 ]]; then
        printf '\nInterrupted; cleaning up.\n'
    fi
    if [[ $1 -ne 0 && $1 -ne 130 && $1 -ne 141 && $1 -ne 143 && -n ${WORK:-} && -d $WORK ]]; then
        step "Logs (the bench exited with status $1)"
        show_logs "$WORK"
    fi
}

# ------------------------------------------------------------ preparation --

require_root
lib_init meshflood
WORK=$(mktemp -d /tmp/mesh-flood.XXXXXX)
register_path "$WORK"

step "Checking tools"
apt_ensure iproute2 iputils-ping iperf3 jq || die "iperf3/jq/iproute2 are required"
[[ -e /dev/net/tun ]] || die "/dev/net/tun is missing"

if [[ -z ${MESH_BIN_DIR:-} || -z ${FLOOD_BIN:-} ]]; then
    find_cargo || die "cargo not found; set MESH_BIN_DIR and FLOOD_BIN to prebuilt binaries"
    info "building: cargo build --release -p mesh-agent -p mesh-controller -p mesh-benches --bins"
    (cd "$ROOT" && cargo build --release -p mesh-agent -p mesh-controller -p mesh-benches --bins) ||
        die "the build failed"
fi
MESH_BIN_DIR=${MESH_BIN_DIR:-$TARGET_DIR/release}
FLOOD_BIN=${FLOOD_BIN:-$TARGET_DIR/release/mesh-handshake-flood}
MESH_BIN="$MESH_BIN_DIR/mesh"
CTL_BIN="$MESH_BIN_DIR/mesh-controller"
for b in "$MESH_BIN" "$CTL_BIN" "$FLOOD_BIN"; do
    [[ -x $b ]] || die "$b is missing"
done
info "mesh from $MESH_BIN_DIR; flood generator $FLOOD_BIN"
info "kernel $(uname -r), $(nproc) CPUs: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"

# -------------------------------------------------------------- topology --

step "Creating namespaces: A ($A_IP), B ($B_IP), controller ($CTL_IP), stranger ($X_IP) on one bridge"
NS_SW=$(ns sw)
NS_A=$(ns a)
NS_B=$(ns b)
NS_C=$(ns ctl)
NS_X=$(ns x)
switch_add "$NS_SW"
for n in "$NS_A" "$NS_B" "$NS_C" "$NS_X"; do ns_add "$n"; done
switch_port "$NS_SW" "$NS_C" eth0 "$CTL_IP/24"
switch_port "$NS_SW" "$NS_A" eth0 "$A_IP/24"
switch_port "$NS_SW" "$NS_B" eth0 "$B_IP/24"
switch_port "$NS_SW" "$NS_X" eth0 "$X_IP/24"
wait_until 10 "underlay A -> B" ns_ping "$NS_A" "$B_IP" || die "no underlay connectivity"
wait_until 10 "underlay stranger -> B" ns_ping "$NS_X" "$B_IP" || die "no underlay connectivity"

# ------------------------------------------------------------------ mesh --

SD="$WORK/mesh"
mkdir -p "$SD/ctl" "$SD/a" "$SD/b"

mesh_overlay_ready() { # NS STATE_DIR -> prints the overlay IP once assigned
    local ip
    ip=$(ip netns exec "$1" "$MESH_BIN" ip --state-dir "$2" 2>/dev/null) || return 1
    ip=${ip//[[:space:]]/}
    [[ -n $ip ]] || return 1
    ip -n "$1" -4 addr show dev mesh0 2>/dev/null | grep -qF "inet $ip/" || return 1
    printf '%s\n' "$ip"
}

mesh_controller_ready() {
    udp_listening "$NS_C" "$CTL_PORT" && [[ -s $SD/ctl/listen.addr ]]
}

status_json() { # NAME -> mesh status --json of that agent
    ip netns exec "$(ns "$1")" "$MESH_BIN" status --json --state-dir "$SD/$1"
}

# udp_rcvbuf_drops NS: datagrams the kernel dropped because a UDP socket's buffer was full.
udp_rcvbuf_drops() {
    ip netns exec "$1" nstat -az UdpRcvbufErrors 2>/dev/null | awk '$1 == "UdpRcvbufErrors" { print $2 }'
}

# cpu_ticks PID: user+system clock ticks the process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

step "Starting mesh: controller and two agents"
spawn "$NS_C" "$WORK/mesh-controller.log" "$CTL_BIN" serve --listen "$CTL_IP:$CTL_PORT" --state-dir "$SD/ctl"
WAIT_WATCH_PID=$LAST_PID wait_until 20 "controller on udp/$CTL_PORT" mesh_controller_ready ||
    die "mesh-controller serve did not start"
ip netns exec "$NS_C" "$CTL_BIN" network create bench --cidr 100.64.0.0/16 --state-dir "$SD/ctl" \
    >"$WORK/mesh-network-create.log" 2>&1 || die "network create failed"
TOKEN=$(ip netns exec "$NS_C" "$CTL_BIN" token create bench --reusable --expires 1h \
    --state-dir "$SD/ctl" 2>"$WORK/mesh-token-create.log") || die "token create failed"
TOKEN=${TOKEN//[[:space:]]/}
declare -A AGENT_PID=()
for name in a b; do
    spawn "$(ns "$name")" "$WORK/mesh-agent-$name.log" "$MESH_BIN" join "$TOKEN" --name "bench-$name" \
        --port "$MESH_PORT" --state-dir "$SD/$name"
    AGENT_PID[$name]=$LAST_PID
done
for name in a b; do
    WAIT_WATCH_PID=${AGENT_PID[$name]} wait_until 30 "agent bench-$name to get its overlay address" \
        mesh_overlay_ready "$(ns "$name")" "$SD/$name" || die "agent bench-$name did not come up"
done
IP_B=$(mesh_overlay_ready "$NS_B" "$SD/b")
wait_until 30 "A -> B over mesh" ns_ping "$NS_A" "$IP_B" || die "no connectivity A -> B over the overlay"
B_KEY=$(status_json a | jq -r '.peers[] | select(.name == "bench-b") | .key')
[[ -n $B_KEY && $B_KEY != null ]] || die "cannot read B's key from A's status"
ok "overlay up: B is $IP_B, key $B_KEY"

spawn "$NS_B" "$WORK/iperf3-server.log" iperf3 -s -p "$IPERF_PORT"
WAIT_WATCH_PID=$LAST_PID wait_until 10 "iperf3 server" tcp_listening "$NS_B" "$IPERF_PORT" ||
    die "iperf3 server did not start"

# measure LABEL: iperf3 A -> B's overlay address; prints Mbit/s.
measure() {
    local json="$WORK/iperf-$1.json" bps
    timeout --foreground $((BENCH_SECONDS + 30)) ip netns exec "$NS_A" \
        iperf3 -c "$IP_B" -p "$IPERF_PORT" -t "$BENCH_SECONDS" -O 1 --connect-timeout 5000 -J \
        >"$json" 2>"$WORK/iperf-$1.err" || true
    bps=$(jq -r '.end.sum_received.bits_per_second // empty' "$json" 2>/dev/null || true)
    if [[ -z $bps ]]; then
        warn "iperf3 ($1) failed: $(jq -r '.error // empty' "$json" 2>/dev/null || tail -n 2 "$WORK/iperf-$1.err")"
        bps=0
    fi
    awk -v b="$bps" 'BEGIN { printf "%.1f\n", b / 1e6 }'
}

counters() { # NAME -> the guard's and related drop counters, one line
    status_json "$1" | jq -c '.counters | {bad_mac1_packets, over_budget_handshakes,
        cookie_replies_sent, unknown_peer_packets, malformed_packets, rejected_packets, udp_rx}'
}

# ------------------------------------------------------------------- run --

# The machine's other load changes from one run to the next: alternate runs
# without and with the flood, and compare medians.
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

BASES=() FLOODS=() CPUS=() DROPS=() FLOOD_OUTS=()
BEFORE=$(counters b)
for ((round = 1; round <= ROUNDS; round++)); do
    step "Round $round/$ROUNDS: TCP A -> B without flood (${BENCH_SECONDS}s)"
    BASES+=("$(measure "base-$round")")
    info "${BASES[-1]} Mbit/s"

    step "Round $round/$ROUNDS: TCP A -> B while the stranger floods B's udp/$MESH_PORT (rate $FLOOD_RATE/s, 0 = unpaced)"
    spawn "$NS_X" "$WORK/flood-$round.log" "$FLOOD_BIN" --key "$B_KEY" --target "$B_IP:$MESH_PORT" \
        --seconds $((BENCH_SECONDS + 3)) --rate "$FLOOD_RATE" --distinct "$FLOOD_DISTINCT"
    FLOOD_PID=$LAST_PID
    # The flood starts once its initiations are precomputed.
    WAIT_WATCH_PID=$FLOOD_PID wait_until 60 "flood generator to start sending" \
        grep -q '^precomputed' "$WORK/flood-$round.log" || die "the flood generator did not start"
    sleep 1
    CPU0=$(cpu_ticks "${AGENT_PID[b]}")
    RCVBUF0=$(udp_rcvbuf_drops "$NS_B")
    T0=${EPOCHREALTIME/[.,]/}
    FLOODS+=("$(measure "flood-$round")")
    CPU1=$(cpu_ticks "${AGENT_PID[b]}")
    RCVBUF1=$(udp_rcvbuf_drops "$NS_B")
    T1=${EPOCHREALTIME/[.,]/}
    CPUS+=("$(awk -v c=$((CPU1 - CPU0)) -v hz="$(getconf CLK_TCK)" -v us=$((T1 - T0)) \
        'BEGIN { printf "%.0f", 100 * c / hz / (us / 1e6) }')")
    DROPS+=("$((${RCVBUF1:-0} - ${RCVBUF0:-0}))")
    info "${FLOODS[-1]} Mbit/s; B's agent used ${CPUS[-1]}% of a core"
    wait "$FLOOD_PID" 2>/dev/null || true # it stops on its own and prints its totals
    stop_pid "$FLOOD_PID"
    FLOOD_OUTS+=("$(tail -n 1 "$WORK/flood-$round.log")")
done
AFTER=$(counters b)
PINGS=$(ip netns exec "$NS_A" ping -n -q -c 3 -W 1 "$IP_B" 2>/dev/null | sed -n 's/.* \([0-9]*\)% packet loss.*/\1/p')

# ---------------------------------------------------------------- report --

BASE=$(printf '%s\n' "${BASES[@]}" | median)
FLOODED=$(printf '%s\n' "${FLOODS[@]}" | median)
RATIO=$(awk -v f="$FLOODED" -v b="$BASE" 'BEGIN { if (b > 0) printf "%.2f", f / b; else print "n/a" }')
step "Results: TCP A -> B over mesh, iperf3, ${BENCH_SECONDS}s per run, $ROUNDS rounds"
printf '    %-28s %s\n' "without flood (Mbit/s)" "${BASES[*]}  median $BASE"
printf '    %-28s %s\n' "during the flood (Mbit/s)" "${FLOODS[*]}  median $FLOODED"
printf '    %-28s %s\n' "ratio of medians" "$RATIO"
printf '    %-28s %s\n' "B agent CPU during flood" "${CPUS[*]} (% of one core)"
printf '    %-28s %s\n' "B socket buffer drops" "${DROPS[*]} (kernel, during each flooded run)"
for out in "${FLOOD_OUTS[@]}"; do
    printf '    %-28s %s\n' "flood generator" "$out"
done
printf '    %-28s %s\n' "B counters before floods" "$BEFORE"
printf '    %-28s %s\n' "B counters after floods" "$AFTER"
printf '    %-28s %s\n' "ping A -> B afterwards" "${PINGS:-?}% loss"
if awk -v r="$RATIO" 'BEGIN { exit !(r != "n/a" && r >= 0.5) }'; then
    ok "the stream kept $(green "$RATIO") of its throughput (goal: at least 0.50)"
else
    warn "the stream kept $(red "$RATIO") of its throughput (goal: at least 0.50)"
fi
