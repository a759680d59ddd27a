#!/usr/bin/env bash
#
# TCP throughput through mesh compared with plain veth and two other
# userspace WireGuard implementations (boringtun-cli, wireguard-go), and
# through mesh's relay: over QUIC (direct UDP between the nodes blocked) and
# over TCP (all UDP of the nodes blocked), as ratios to the direct path; and
# mesh over an IPv6 underlay (the same links with 2001:db8:: addresses, a
# controller reached over IPv6); mesh without TUN offloads (mesh-nooffload),
# flannel's arrangement, TCP over a VXLAN device on mesh0 (mesh-vxlan),
# nebula and tinc as further baselines. Each round measures every path once
# (one stream and 4 parallel streams, the tunnel processes' CPU time per GB,
# the idle ping RTT); the table gives medians over the rounds. See
# benches/README.md. Needs root; everything runs in throwaway network
# namespaces that are removed on exit.
#
# Environment:
#   BENCH_SECONDS   length of each iperf3 run in seconds (default 10)
#   BENCH_ROUNDS    rounds; each measures every path once (default 3)
#   BENCH_STREAMS   iperf3 stream counts to run per path (default "1 4";
#                   CPU per GB is taken in the 1-stream run)
#   BENCH_PATHS     paths to measure, space separated
#                   (default "veth mesh mesh-vxlan mesh-nooffload relay-quic
#                   relay-tcp mesh-v6 boringtun wireguard-go nebula tinc";
#                   mesh-vxlan and the relay paths need mesh)
#   MESH_BASE_DIR   a directory holding the mesh and mesh-controller of another
#                   build (the one before a change, say): adds the path
#                   mesh-base, that build's pair, measured in the same rounds
#                   right after mesh, and the ratio mesh / mesh-base
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-netns.sh
. "$HERE/lib-netns.sh"

ALL_PATHS="veth mesh mesh-vxlan mesh-nooffload relay-quic relay-tcp mesh-v6 boringtun wireguard-go nebula tinc"
BENCH_PATHS=${BENCH_PATHS:-$ALL_PATHS}
if [[ -n ${MESH_BASE_DIR:-} ]]; then
    ALL_PATHS+=" mesh-base"
    [[ " $BENCH_PATHS " == *" mesh-base "* ]] || BENCH_PATHS+=" mesh-base"
fi
BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_STREAMS=${BENCH_STREAMS:-1 4}
[[ $BENCH_SECONDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer (got '$BENCH_SECONDS')"
[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer (got '$BENCH_ROUNDS')"
read -r -a STREAMS <<<"$BENCH_STREAMS"
[[ ${#STREAMS[@]} -gt 0 ]] || die "BENCH_STREAMS must name at least one stream count"
for n in "${STREAMS[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_STREAMS must be positive integers (got '$BENCH_STREAMS')"
done
for p in $BENCH_PATHS; do
    [[ " $ALL_PATHS " == *" $p "* ]] || warn "unknown path '$p' in BENCH_PATHS ignored (known: $ALL_PATHS)"
done
CLK_TCK=$(getconf CLK_TCK)

TOOLS_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/bench-tools"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# Underlay (documentation range) and overlays (inside 100.64.0.0/10).
CTL_IP=192.0.2.1
A_IP=192.0.2.11
B_IP=192.0.2.12
# The IPv6 underlay of mesh-v6 (documentation prefix), added to the same links
# only for that run, so that every other path stays IPv4-only.
CTL_IP6=2001:db8::1
A_IP6=2001:db8::11
B_IP6=2001:db8::12
CTL_PORT=7443
MESH_PORT=51820
IPERF_PORT=5201
# The further baselines' overlays (inside 100.64.0.0/10, beside
# boringtun's 100.100.1.0/24 and wireguard-go's 100.100.2.0/24).
NEBULA_NET=100.100.3
NEBULA_PORT=4242
TINC_NET=100.100.4
TINC_PORT=655

# Per path, space-separated values, one per round: MBITS["PATH/STREAMS"]
# (Mbit/s), CPU[PATH] (CPU seconds per GB of the two endpoints' tunnel
# processes), RELAY_CPU[PATH] (of the relay, the controller process), RTT[PATH]
# (median ping RTT in ms).
declare -A MBITS=() CPU=() RELAY_CPU=() RTT=() WHY=()
ROUND=0
# The tunnel processes of the path being measured (none for veth) and, on the
# relay paths, the controller that relays.
CPU_PIDS=()
RELAY_PID=''
REPORTED=0 # set once the results (and logs of skipped paths) are printed

lib_on_exit() {
    if [[ $1 -eq 130 || $1 -eq 143 ]]; then
        printf '\nInterrupted; cleaning up.\n'
    fi
    if [[ $1 -ne 0 && $1 -ne 130 && $1 -ne 141 && $1 -ne 143 && $REPORTED -eq 0 && -n ${WORK:-} && -d $WORK ]]; then
        step "Logs (the bench exited with status $1)"
        show_logs "$WORK"
    fi
}

skip() { # skip PATH REASON...
    local path="$1"
    shift
    WHY[$path]="$*"
    warn "$path: skipped: $*"
}

want() { [[ " $BENCH_PATHS " == *" $1 "* ]]; }
# Wanted and not skipped (a path skipped in one round is not tried again).
active() { want "$1" && [[ -z ${WHY[$1]:-} ]]; }

# ------------------------------------------------------------ preparation --

require_root
lib_init meshbench
WORK=$(mktemp -d /tmp/mesh-bench.XXXXXX)
register_path "$WORK"

step "Checking tools"
apt_ensure iproute2 iputils-ping iperf3 jq || die "iperf3/jq/iproute2 are required"
HAVE_WG_TOOLS=1
if ! apt_ensure wireguard-tools; then
    HAVE_WG_TOOLS=0
fi
if want wireguard-go && ! apt_ensure wireguard-go; then
    skip wireguard-go "the Debian package wireguard-go could not be installed"
fi
if want nebula && ! apt_ensure nebula; then
    skip nebula "the Debian package nebula could not be installed"
fi
if want tinc && ! apt_ensure tinc; then
    skip tinc "the Debian package tinc could not be installed"
fi
# The relay paths block the pair's UDP with nftables, as a firewall would (mesh-v6 too, when
# the pair does not choose IPv6 by itself).
if { want relay-quic || want relay-tcp || want mesh-v6; } && ! apt_ensure nftables; then
    for p in relay-quic relay-tcp; do
        want "$p" && skip "$p" "the Debian package nftables could not be installed"
    done
fi
[[ -e /dev/net/tun ]] || warn "/dev/net/tun is missing: tunnel paths will fail"

BORINGTUN="$TOOLS_DIR/bin/boringtun-cli"
if want boringtun && [[ ! -x $BORINGTUN ]]; then
    if find_cargo; then
        info "installing boringtun-cli from crates.io into $TOOLS_DIR (once)"
        if ! cargo install boringtun-cli --locked --root "$TOOLS_DIR" >"$WORK/boringtun-install.log" 2>&1; then
            tail -n 20 "$WORK/boringtun-install.log" >&2
            skip boringtun "cargo install boringtun-cli failed"
        fi
    else
        skip boringtun "cargo not found, cannot install boringtun-cli"
    fi
fi

MESH_BIN="$TARGET_DIR/release/mesh"
CTL_BIN="$TARGET_DIR/release/mesh-controller"
# The build's binaries; bench_mesh points MESH_BIN and CTL_BIN at MESH_BASE_DIR's for mesh-base.
OWN_MESH_BIN=$MESH_BIN
OWN_CTL_BIN=$CTL_BIN
if want mesh-base && [[ ! -x ${MESH_BASE_DIR:-}/mesh || ! -x ${MESH_BASE_DIR:-}/mesh-controller ]]; then
    skip mesh-base "MESH_BASE_DIR (${MESH_BASE_DIR:-}) does not hold both mesh and mesh-controller"
fi
skip_mesh_paths() { # REASON: skip every path that runs mesh
    local p
    for p in mesh mesh-vxlan mesh-nooffload relay-quic relay-tcp mesh-v6; do
        want "$p" && skip "$p" "$1"
    done
    return 0
}
if want mesh || want mesh-nooffload || want mesh-v6; then
    if find_cargo; then
        info "building mesh: cargo build --release --bins"
        if ! (cd "$ROOT" && cargo build --release --bins); then
            skip_mesh_paths "cargo build --release --bins failed"
        elif [[ ! -x $MESH_BIN || ! -x $CTL_BIN ]]; then
            skip_mesh_paths "the build did not produce $MESH_BIN and $CTL_BIN"
        fi
    else
        skip_mesh_paths "cargo not found, cannot build mesh"
    fi
fi

info "kernel $(uname -r), $(nproc) CPUs: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
info "$(iperf3 --version | head -n 1); each run lasts ${BENCH_SECONDS}s (+1s omitted warm-up)"
info "$BENCH_ROUNDS round(s), streams: ${STREAMS[*]}; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# -------------------------------------------------------------- topology --

step "Creating namespaces: A ($A_IP), B ($B_IP), controller ($CTL_IP) on one bridge"
NS_SW=$(ns sw)
NS_A=$(ns a)
NS_B=$(ns b)
NS_C=$(ns ctl)
switch_add "$NS_SW"
for n in "$NS_A" "$NS_B" "$NS_C"; do ns_add "$n"; done
switch_port "$NS_SW" "$NS_C" eth0 "$CTL_IP/24"
switch_port "$NS_SW" "$NS_A" eth0 "$A_IP/24"
switch_port "$NS_SW" "$NS_B" eth0 "$B_IP/24"
wait_until 10 "underlay A -> B" ns_ping "$NS_A" "$B_IP" || die "no underlay connectivity"
wait_until 10 "underlay A -> controller" ns_ping "$NS_A" "$CTL_IP" || die "no underlay connectivity"

spawn "$NS_B" "$WORK/iperf3-server.log" iperf3 -s -p "$IPERF_PORT"
WAIT_WATCH_PID=$LAST_PID wait_until 10 "iperf3 server" tcp_listening "$NS_B" "$IPERF_PORT" ||
    die "iperf3 server did not start"
ok "namespaces ready, iperf3 server listening in B"

# cpu_ticks PID...: the user+system CPU time (clock ticks) the processes have
# used so far, all their threads (fields 14 and 15 of /proc/PID/stat; the
# name in field 2 may hold spaces, so the fields are counted after its ')').
cpu_ticks() {
    local t=0 p st f
    for p in "$@"; do
        st=$(<"/proc/$p/stat") || return 1
        read -r -a f <<<"${st##*) }"
        t=$((t + f[11] + f[12]))
    done
    printf '%s\n' "$t"
}

# per_gb TICKS BYTES: CPU seconds per GB (10^9 bytes).
per_gb() { awk -v t="$1" -v b="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (t / hz) / (b / 1e9) }'; }

# measure PATH ADDRESS STREAMS: iperf3 A -> ADDRESS with STREAMS parallel
# streams; appends Mbit/s to MBITS[PATH/STREAMS]. In the 1-stream run it also
# reads the CPU time of CPU_PIDS (and RELAY_PID) before and after and appends
# their CPU seconds per GB moved to CPU[PATH] (RELAY_CPU[PATH]); the bytes are
# the receiver's plus the omitted warm-up second's, which the CPU time covers.
measure() {
    local path="$1" dst="$2" n="$3" json="$WORK/iperf-$1-P$3-r$ROUND.json" bps bytes err
    local t0='' t1='' r0='' r1='' mbit cpu='' note=''
    info "iperf3 -c $dst -P $n -t $BENCH_SECONDS ($path, round $ROUND)"
    if [[ $n -eq 1 && ${#CPU_PIDS[@]} -gt 0 ]]; then
        t0=$(cpu_ticks "${CPU_PIDS[@]}") || t0=''
        [[ -z $RELAY_PID ]] || r0=$(cpu_ticks "$RELAY_PID") || r0=''
    fi
    if timeout --foreground $((BENCH_SECONDS + 30)) ip netns exec "$NS_A" \
        iperf3 -c "$dst" -p "$IPERF_PORT" -P "$n" -t "$BENCH_SECONDS" -O 1 --connect-timeout 5000 -J \
        >"$json" 2>"$WORK/iperf-$path.err"; then
        if [[ -n $t0 ]]; then
            t1=$(cpu_ticks "${CPU_PIDS[@]}") || t1=''
            [[ -z $r0 ]] || r1=$(cpu_ticks "$RELAY_PID") || r1=''
        fi
        bps=$(jq -r '.end.sum_received.bits_per_second // empty' "$json")
        bytes=$(jq -r '(.end.sum_received.bytes // 0)
            + ([.intervals[]? | select(.sum.omitted) | .sum.bytes] | add // 0)' "$json")
        if [[ -n $bps ]]; then
            mbit=$(awk -v b="$bps" 'BEGIN { printf "%.1f", b / 1e6 }')
            MBITS[$path/$n]+=" $mbit"
            if [[ -n $t0 && -n $t1 && $bytes -gt 0 ]]; then
                cpu=$(per_gb $((t1 - t0)) "$bytes")
                CPU[$path]+=" $cpu"
                note=", tunnel processes $cpu CPU s/GB"
                if [[ -n $r0 && -n $r1 ]]; then
                    RELAY_CPU[$path]+=" $(per_gb $((r1 - r0)) "$bytes")"
                    note+=" (+ relay $(per_gb $((r1 - r0)) "$bytes"))"
                fi
            fi
            ok "$path, $n stream(s): $mbit Mbit/s$note"
            return 0
        fi
    fi
    err=$(jq -r '.error // empty' "$json" 2>/dev/null || true)
    skip "$path" "iperf3 -P $n failed: ${err:-$(tail -n 3 "$WORK/iperf-$path.err" "$json" 2>/dev/null | tr '\n' ' ')}"
    return 1
}

# latency PATH ADDRESS: 50 pings A -> ADDRESS 20 ms apart on the idle path;
# appends their median RTT (ms) to RTT[PATH].
latency() {
    local path="$1" dst="$2" med
    med=$(ip netns exec "$NS_A" ping -n -c 50 -i 0.02 -W 1 "$dst" 2>/dev/null |
        sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR >= 25) printf "%.3f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }') || true
    if [[ -z $med ]]; then
        warn "$path: fewer than 25 of 50 pings answered, no RTT this round"
        return 0
    fi
    RTT[$path]+=" $med"
    info "$path: median ping RTT $med ms"
}

# run_path PATH ADDRESS: the idle RTT, then one iperf3 run per stream count.
run_path() {
    local n
    latency "$1" "$2"
    for n in "${STREAMS[@]}"; do
        measure "$1" "$2" "$n" || return 1
    done
}

# ------------------------------------------------------------------ veth --

bench_veth() {
    step "Path 1: plain veth (baseline), round $ROUND"
    CPU_PIDS=()
    RELAY_PID=''
    run_path veth "$B_IP"
}

# ------------------------------------------------------------------ mesh --

MESH_PIDS=()

mesh_stop() {
    local i
    for ((i = ${#MESH_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${MESH_PIDS[i]}"; done
    MESH_PIDS=()
}

mesh_overlay_ready() { # NS STATE_DIR -> prints the overlay IP once assigned
    local ip
    ip=$(ip netns exec "$1" "$MESH_BIN" ip --state-dir "$2" 2>/dev/null) || return 1
    ip=${ip//[[:space:]]/}
    [[ -n $ip ]] || return 1
    ip -n "$1" -4 addr show dev mesh0 2>/dev/null | grep -qF "inet $ip/" || return 1
    printf '%s\n' "$ip"
}

# Bound its UDP socket and wrote listen.addr (needed by `token create`).
mesh_controller_ready() {
    udp_listening "$NS_C" "$CTL_PORT" && [[ -s $1/listen.addr ]]
}

# mesh_pair PATH STATE_DIR LISTEN: a controller listening on LISTEN and the
# agents bench-a and bench-b joined through it, up and pinging; leaves B's
# overlay address in PAIR_IP_B, the agents' PIDs in PAIR_PIDS and the
# controller's in PAIR_CTL_PID. The agents run with the environment
# assignments in MESH_ENV (none by default). Failures are skipped as PATH
# (logs carry PATH's name, so that a skipped path shows them).
MESH_ENV=()
mesh_pair() {
    local path="$1" sd="$2" listen="$3" token ip_b name netns
    mkdir -p "$sd/ctl" "$sd/a" "$sd/b"

    spawn "$NS_C" "$WORK/$path-controller.log" "$CTL_BIN" serve --listen "$listen" --state-dir "$sd/ctl"
    MESH_PIDS+=("$LAST_PID")
    PAIR_CTL_PID=$LAST_PID
    WAIT_WATCH_PID=$LAST_PID wait_until 20 "controller on udp/$CTL_PORT" \
        mesh_controller_ready "$sd/ctl" || {
        skip "$path" "mesh-controller serve did not start (see $path-controller.log)"
        return 1
    }
    ip netns exec "$NS_C" "$CTL_BIN" network create bench --cidr 100.64.0.0/16 --state-dir "$sd/ctl" \
        >"$WORK/$path-network-create.log" 2>&1 || {
        skip "$path" "mesh-controller network create failed: $(tail -n 3 "$WORK/$path-network-create.log")"
        return 1
    }
    if ! token=$(ip netns exec "$NS_C" "$CTL_BIN" token create bench --reusable --expires 1h \
        --state-dir "$sd/ctl" 2>"$WORK/$path-token-create.log"); then
        skip "$path" "mesh-controller token create failed: $(tail -n 3 "$WORK/$path-token-create.log")"
        return 1
    fi
    token=${token//[[:space:]]/}
    if [[ -z $token ]]; then
        skip "$path" "mesh-controller token create printed no token"
        return 1
    fi

    local -A agent_pid=()
    for name in a b; do
        netns=$(ns "$name")
        spawn "$netns" "$WORK/$path-agent-$name.log" env "${MESH_ENV[@]}" "$MESH_BIN" join "$token" \
            --name "bench-$name" --port "$MESH_PORT" --state-dir "$sd/$name"
        MESH_PIDS+=("$LAST_PID")
        agent_pid[$name]=$LAST_PID
    done
    for name in a b; do
        netns=$(ns "$name")
        WAIT_WATCH_PID=${agent_pid[$name]} wait_until 30 "agent bench-$name to get its overlay address" \
            mesh_overlay_ready "$netns" "$sd/$name" || {
            skip "$path" "agent bench-$name did not come up (see $path-agent-$name.log)"
            return 1
        }
    done
    PAIR_PIDS=("${agent_pid[a]}" "${agent_pid[b]}")
    ip_b=$(mesh_overlay_ready "$NS_B" "$sd/b")
    info "overlay: A=$(mesh_overlay_ready "$NS_A" "$sd/a") B=$ip_b, mesh0 MTU $(ip -n "$NS_A" -o link show mesh0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
    info "A: $(grep -o 'mesh0 opened without offloads' "$WORK/$path-agent-a.log" | head -n 1 || echo 'mesh0 with offloads (no warning in the log)')"
    wait_until 30 "A -> B over mesh" ns_ping "$NS_A" "$ip_b" || {
        skip "$path" "no connectivity A -> B over the overlay"
        return 1
    }
    PAIR_IP_B=$ip_b
}

# bench_mesh PATH: a fresh pair (mesh, or mesh-nooffload: the same with
# MESH_TUN_OFFLOAD=0 in both agents' environment, mesh0 without TUN offloads,
# or mesh-base: the binaries in MESH_BASE_DIR, which the round loop puts back after it).
bench_mesh() {
    local path="$1"
    MESH_IP_B=''
    if [[ $path == mesh ]]; then
        step "Path 2: mesh (controller + two agents), round $ROUND"
        MESH_ENV=()
    elif [[ $path == mesh-base ]]; then
        step "Path 2b: mesh of the build in MESH_BASE_DIR ($MESH_BASE_DIR), round $ROUND"
        MESH_ENV=()
        MESH_BIN=$MESH_BASE_DIR/mesh
        CTL_BIN=$MESH_BASE_DIR/mesh-controller
    else
        step "Path 2a: mesh without TUN offloads (MESH_TUN_OFFLOAD=0), round $ROUND"
        MESH_ENV=(MESH_TUN_OFFLOAD=0)
    fi
    if [[ -n ${WHY[$path]:-} ]]; then
        info "skipped: ${WHY[$path]}"
        return 1
    fi
    mesh_pair "$path" "$WORK/$path-r$ROUND" "$CTL_IP:$CTL_PORT" || return 1
    MESH_IP_B=$PAIR_IP_B
    MESH_SD=$WORK/$path-r$ROUND
    CPU_PIDS=("${PAIR_PIDS[@]}")
    RELAY_PID=''
    run_path "$path" "$PAIR_IP_B"
}

# ------------------------------------------------------------ mesh-vxlan --

# Flannel's arrangement on the pair bench_mesh left up: a VXLAN device in A and B on mesh0
# (the overlay addresses as its endpoints, flannel's UDP port 8472, 50 bytes under mesh0's MTU),
# pod-like addresses on it, TCP through it. It is one UDP flow per pair of nodes, so long runs
# of one flow reach a TUN write batch: the traffic that showed the coalescing length bug
# (benches/README.md), which a plain TCP stream rarely builds.
VX_A=10.244.0.1
VX_B=10.244.0.2
vxlan_up() { # NS LOCAL REMOTE ADDRESS MTU
    ip -n "$1" link add vx0 type vxlan id 1 local "$2" remote "$3" dstport 8472 dev mesh0 &&
        ip -n "$1" link set vx0 mtu "$5" &&
        ip -n "$1" addr add "$4/24" dev vx0 &&
        ip -n "$1" link set vx0 up
}
vxlan_down() {
    ip -n "$NS_A" link del vx0 2>/dev/null || true
    ip -n "$NS_B" link del vx0 2>/dev/null || true
}
bench_vxlan() {
    local ip_a mtu
    step "Path 2c: TCP over VXLAN on mesh0 (flannel's arrangement), round $ROUND"
    if [[ -n ${WHY[mesh-vxlan]:-} ]]; then
        info "skipped: ${WHY[mesh-vxlan]}"
        return 1
    fi
    if [[ -z ${MESH_IP_B:-} ]]; then
        skip mesh-vxlan "the mesh pair did not come up"
        return 1
    fi
    ip_a=$(mesh_overlay_ready "$NS_A" "$MESH_SD/a")
    mtu=$(ip -n "$NS_A" -o link show mesh0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
    if ! { vxlan_up "$NS_A" "$ip_a" "$MESH_IP_B" "$VX_A" $((mtu - 50)) &&
        vxlan_up "$NS_B" "$MESH_IP_B" "$ip_a" "$VX_B" $((mtu - 50)); }; then
        skip mesh-vxlan "the VXLAN devices could not be made"
        vxlan_down
        return 1
    fi
    if ! wait_until 10 "A -> B over VXLAN" ns_ping "$NS_A" "$VX_B"; then
        skip mesh-vxlan "no connectivity A -> B over VXLAN on mesh0"
        vxlan_down
        return 1
    fi
    run_path mesh-vxlan "$VX_B" || true
    vxlan_down
}

# The transport of the controller session of the agent with state dir $2 in namespace $1.
mesh_transport() {
    ip netns exec "$1" "$MESH_BIN" status --json --state-dir "$2" 2>/dev/null |
        jq -r '.controller.transport // empty'
}

mesh_path_to() { # NS STATE_DIR PEER_NAME -> prints direct or relay
    ip netns exec "$1" "$MESH_BIN" status --json --state-dir "$2" 2>/dev/null |
        jq -r --arg n "$3" '.peers[] | select(.name == $n) | .path'
}

on_relay() { [[ $(mesh_path_to "$NS_A" "$MESH_SD/a" bench-b) == relay ]]; }
# The same, with a ping first: an idle pair notices a dead direct path only on its idle
# schedule; traffic (as a user's would) makes it look at once.
on_relay_pinging() {
    ip netns exec "$NS_A" ping -c 1 -W 1 "$MESH_IP_B" >/dev/null 2>&1 || true
    on_relay
}
both_on_tcp() {
    [[ $(mesh_transport "$NS_A" "$MESH_SD/a") == tcp && $(mesh_transport "$NS_B" "$MESH_SD/b") == tcp ]]
}

# Drops UDP between the two nodes (their direct path), or all their UDP (QUIC to the
# controller too), as a firewall in each node's namespace would. The overlay (mesh0) is spared.
block_udp() { # direct|all
    local n peer
    for n in a b; do
        if [[ $1 == direct ]]; then
            peer=$([[ $n == a ]] && echo "$B_IP" || echo "$A_IP")
            ip netns exec "$(ns "$n")" nft "table inet benchblock { chain o { type filter hook output priority 0; oifname != \"mesh0\" ip daddr $peer meta l4proto udp drop; }; chain i { type filter hook input priority 0; iifname != \"mesh0\" ip saddr $peer meta l4proto udp drop; }; }"
        else
            ip netns exec "$(ns "$n")" nft "table inet benchblock { chain o { type filter hook output priority 0; oifname != \"mesh0\" meta l4proto udp drop; }; chain i { type filter hook input priority 0; iifname != \"mesh0\" meta l4proto udp drop; }; }"
        fi
    done
}

unblock_udp() {
    local n
    for n in a b; do ip netns exec "$(ns "$n")" nft delete table inet benchblock 2>/dev/null || true; done
}

# On the pair of `mesh` (the agents' CPU time is counted as the path's, the
# controller's, which embeds the relay, apart as RELAY_CPU).
bench_relay() {
    step "Path 2b: mesh through the controller's relay, over QUIC and over TCP, round $ROUND"
    if [[ -z ${MESH_IP_B:-} ]]; then
        active relay-quic && skip relay-quic "mesh was not measured"
        active relay-tcp && skip relay-tcp "mesh was not measured"
        return 1
    fi
    CPU_PIDS=("${PAIR_PIDS[@]}")
    RELAY_PID=$PAIR_CTL_PID
    if active relay-quic; then
        block_udp direct
        if wait_until 20 "A -> B on the relay" on_relay_pinging; then
            wait_until 10 "A -> B over the relay" ns_ping "$NS_A" "$MESH_IP_B" || true
            run_path relay-quic "$MESH_IP_B" || true
        else
            skip relay-quic "the pair did not move to the relay"
        fi
        unblock_udp
    fi
    if active relay-tcp; then
        block_udp all
        if wait_until 30 "both agents on TCP" both_on_tcp && wait_until 20 "A -> B on the relay" on_relay_pinging; then
            wait_until 10 "A -> B over the relay" ns_ping "$NS_A" "$MESH_IP_B" || true
            run_path relay-tcp "$MESH_IP_B" || true
        else
            skip relay-tcp "the agents did not move to TCP"
        fi
        unblock_udp
    fi
}

# ------------------------------------------------------------ mesh-v6 --

# The family of A's direct path to bench-b (ipv4, ipv6; empty while there is
# none) in the pair under state dir $1: the status's `family`, else read from
# the endpoint ("[...]:port" is IPv6).
mesh_family_to_b() {
    ip netns exec "$NS_A" "$MESH_BIN" status --json --state-dir "$1/a" 2>/dev/null |
        jq -r '.peers[] | select(.name == "bench-b")
            | select(.path == "direct")
            | (.family // (if (.endpoint // "") | startswith("[") then "ipv6"
                           elif (.endpoint // "") != "" then "ipv4" else empty end))'
}
on_v6() { [[ $(mesh_family_to_b "$1") == ipv6 ]]; }

# Gives the controller, A and B their IPv6 addresses on the same links (no
# DAD, so that they are usable at once) and waits until A reaches both.
underlay_v6() {
    local n addr
    for n in ctl a b; do
        case $n in ctl) addr=$CTL_IP6 ;; a) addr=$A_IP6 ;; b) addr=$B_IP6 ;; esac
        ip -n "$(ns "$n")" addr add "$addr/64" dev eth0 nodad || return 1
    done
    wait_until 10 "underlay A -> B over IPv6" ns_ping "$NS_A" "$B_IP6" &&
        wait_until 10 "underlay A -> controller over IPv6" ns_ping "$NS_A" "$CTL_IP6"
}

# Takes the IPv6 addresses away again, so that the next round's other paths
# stay IPv4-only.
underlay_v6_down() {
    local n addr
    for n in ctl a b; do
        case $n in ctl) addr=$CTL_IP6 ;; a) addr=$A_IP6 ;; b) addr=$B_IP6 ;; esac
        ip -n "$(ns "$n")" addr del "$addr/64" dev eth0 2>/dev/null || true
    done
}

# Drops IPv4 UDP between the nodes (not to the controller), so that a pair
# that does not choose IPv6 by itself has no other direct path.
block_udp4_direct() {
    local n peer
    for n in a b; do
        peer=$([[ $n == a ]] && echo "$B_IP" || echo "$A_IP")
        ip netns exec "$(ns "$n")" nft "table ip benchv4 { chain o { type filter hook output priority 0; ip daddr $peer meta l4proto udp drop; }; chain i { type filter hook input priority 0; ip saddr $peer meta l4proto udp drop; }; }"
    done
}

unblock_udp4_direct() {
    local n
    for n in a b; do ip netns exec "$(ns "$n")" nft delete table ip benchv4 2>/dev/null || true; done
}

bench_mesh_v6() {
    step "Path 2c: mesh over an IPv6 underlay (controller at [$CTL_IP6]:$CTL_PORT), round $ROUND"
    if [[ -n ${WHY[mesh-v6]:-} ]]; then
        info "skipped: ${WHY[mesh-v6]}"
        return 1
    fi
    underlay_v6 || {
        skip mesh-v6 "the IPv6 underlay did not come up"
        return 1
    }
    local sd="$WORK/mesh-v6-r$ROUND"
    MESH_ENV=()
    mesh_pair mesh-v6 "$sd" "[$CTL_IP6]:$CTL_PORT" || return 1
    # Both families are equal here, so mesh should choose IPv6 by itself; if it
    # does not, IPv4 between the nodes is blocked (and that is said).
    if ! wait_until 20 "A -> B direct over IPv6" on_v6 "$sd"; then
        warn "mesh-v6: the pair did not choose IPv6 by itself; blocking IPv4 UDP between the nodes"
        block_udp4_direct
        wait_until 20 "A -> B direct over IPv6 (IPv4 blocked)" on_v6 "$sd" || {
            unblock_udp4_direct
            skip mesh-v6 "the pair did not go direct over IPv6"
            return 1
        }
    fi
    ok "A -> B direct over IPv6: $(ip netns exec "$NS_A" "$MESH_BIN" status --json --state-dir "$sd/a" 2>/dev/null |
        jq -r '.peers[] | select(.name == "bench-b") | .endpoint')"
    CPU_PIDS=("${PAIR_PIDS[@]}")
    RELAY_PID=''
    run_path mesh-v6 "$PAIR_IP_B" || true
    unblock_udp4_direct
}

# --------------------------------------------------- userspace WireGuard --

WG_PIDS=()
WG_SOCKS=()

# Stops the tunnel processes and removes the UAPI sockets they created, so
# that the next round can start them again.
wg_stop() {
    local i
    for ((i = ${#WG_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${WG_PIDS[i]}"; done
    WG_PIDS=()
    for i in "${WG_SOCKS[@]}"; do rm -f -- "$i"; done
    WG_SOCKS=()
}

# wg_side PATH NS IFNAME ADDR PORT PRIVKEY PEERPUB PEER_UNDERLAY PEER_OVERLAY CMD...
# Start one userspace WireGuard (CMD, which creates IFNAME) in NS and
# configure it with `wg` through its UAPI socket, then with `ip`.
wg_side() {
    local path="$1" netns="$2" ifname="$3" addr="$4" port="$5" key="$6" peer="$7" ep="$8" peer_ip="$9"
    shift 9
    local sock="/var/run/wireguard/$ifname.sock"
    if [[ -S $sock ]]; then
        skip "$path" "$sock already exists (another instance running?)"
        return 1
    fi
    register_path "$sock"
    spawn "$netns" "$WORK/$path-$ifname.log" "$@" "$ifname"
    WG_PIDS+=("$LAST_PID")
    WG_SOCKS+=("$sock")
    WAIT_WATCH_PID=$LAST_PID wait_until 15 "$path UAPI socket $sock" test -S "$sock" || {
        skip "$path" "$1 did not create $ifname (see $path-$ifname.log)"
        return 1
    }
    ip netns exec "$netns" wg set "$ifname" private-key "$key" listen-port "$port" \
        peer "$peer" allowed-ips "$peer_ip/32" endpoint "$ep:$port" >>"$WORK/$path-wg.log" 2>&1 || {
        skip "$path" "wg set $ifname failed: $(tail -n 2 "$WORK/$path-wg.log")"
        return 1
    }
    if ! { ip -n "$netns" addr add "$addr/24" dev "$ifname" &&
        ip -n "$netns" link set "$ifname" mtu 1420 up; }; then
        skip "$path" "cannot configure $ifname with ip"
        return 1
    fi
}

# bench_wg PATH SUBNET_PREFIX CMD...: a two-node tunnel A <-> B with CMD.
bench_wg() {
    local path="$1" net="$2"
    shift 2
    if [[ $HAVE_WG_TOOLS -eq 0 ]]; then
        skip "$path" "wireguard-tools (wg) could not be installed"
        return 1
    fi
    local kd="$WORK/keys-$path" ifa="wg${path:0:2}-a" ifb="wg${path:0:2}-b"
    mkdir -p "$kd"
    (umask 077 && wg genkey >"$kd/a.key" && wg genkey >"$kd/b.key")
    wg pubkey <"$kd/a.key" >"$kd/a.pub"
    wg pubkey <"$kd/b.key" >"$kd/b.pub"
    local port=$((MESH_PORT + 10))
    wg_side "$path" "$NS_A" "$ifa" "$net.1" "$port" "$kd/a.key" "$(cat "$kd/b.pub")" "$B_IP" "$net.2" "$@" &&
        wg_side "$path" "$NS_B" "$ifb" "$net.2" "$port" "$kd/b.key" "$(cat "$kd/a.pub")" "$A_IP" "$net.1" "$@" ||
        return 1
    wait_until 20 "A -> B over $path" ns_ping "$NS_A" "$net.2" || {
        skip "$path" "no connectivity A -> B over the tunnel"
        return 1
    }
    CPU_PIDS=("${WG_PIDS[@]}")
    RELAY_PID=''
    run_path "$path" "$net.2"
}

bench_boringtun() {
    step "Path 3: boringtun-cli $("$BORINGTUN" --version 2>/dev/null | awk '{print $2}'), round $ROUND"
    if [[ -n ${WHY[boringtun]:-} ]]; then
        info "skipped: ${WHY[boringtun]}"
        return 1
    fi
    bench_wg boringtun 100.100.1 "$BORINGTUN" --foreground --disable-drop-privileges \
        --log "$WORK/boringtun-internal.out"
}

bench_wggo() {
    step "Path 4: wireguard-go $(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || true), round $ROUND"
    if [[ -n ${WHY[wireguard-go]:-} ]]; then
        info "skipped: ${WHY[wireguard-go]}"
        return 1
    fi
    bench_wg wireguard-go 100.100.2 wireguard-go -f
}

# ---------------------------------------------------------------- nebula --

OTHER_PIDS=()

other_stop() {
    local i
    for ((i = ${#OTHER_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${OTHER_PIDS[i]}"; done
    OTHER_PIDS=()
}

# nebula_config NAME PEER_OVERLAY PEER_UNDERLAY: the config of node NAME (a or
# b), with no lighthouse: the peer is known from a static host map. Its UDP
# socket buffers are 7 MiB, as mesh asks for its own; MTU 1420 as for the
# WireGuard baselines; the cipher is nebula's default (AES-GCM).
nebula_config() {
    local d="$WORK/nebula"
    cat <<EOF
pki:
  ca: $d/ca.crt
  cert: $d/$1.crt
  key: $d/$1.key
static_host_map:
  "$2": ["$3:$NEBULA_PORT"]
lighthouse:
  am_lighthouse: false
  hosts: []
listen:
  host: 0.0.0.0
  port: $NEBULA_PORT
  read_buffer: 7340032
  write_buffer: 7340032
punchy:
  punch: false
tun:
  disabled: false
  dev: nebula1
  mtu: 1420
logging:
  level: info
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
EOF
}

# A CA and a certificate for each node (made once), then nebula in A and B.
bench_nebula() {
    step "Path 5: nebula $(nebula -version 2>/dev/null | awk '{print $2}'), round $ROUND"
    if [[ -n ${WHY[nebula]:-} ]]; then
        info "skipped: ${WHY[nebula]}"
        return 1
    fi
    local d="$WORK/nebula" name
    if [[ ! -s $d/b.crt ]]; then
        mkdir -p "$d"
        if ! { nebula-cert ca -name mesh-bench -out-crt "$d/ca.crt" -out-key "$d/ca.key" &&
            nebula-cert sign -ca-crt "$d/ca.crt" -ca-key "$d/ca.key" -name a -ip "$NEBULA_NET.1/24" \
                -out-crt "$d/a.crt" -out-key "$d/a.key" &&
            nebula-cert sign -ca-crt "$d/ca.crt" -ca-key "$d/ca.key" -name b -ip "$NEBULA_NET.2/24" \
                -out-crt "$d/b.crt" -out-key "$d/b.key"; } >"$WORK/nebula-cert.log" 2>&1; then
            skip nebula "nebula-cert failed: $(tail -n 2 "$WORK/nebula-cert.log" | tr '\n' ' ')"
            return 1
        fi
        nebula_config a "$NEBULA_NET.2" "$B_IP" >"$d/a.yml"
        nebula_config b "$NEBULA_NET.1" "$A_IP" >"$d/b.yml"
    fi
    for name in a b; do
        spawn "$(ns "$name")" "$WORK/nebula-$name.log" nebula -config "$d/$name.yml"
        OTHER_PIDS+=("$LAST_PID")
        WAIT_WATCH_PID=$LAST_PID wait_until 15 "nebula in $name to create nebula1" \
            ip -n "$(ns "$name")" addr show dev nebula1 || {
            skip nebula "nebula in $name did not start (see nebula-$name.log)"
            return 1
        }
    done
    wait_until 20 "A -> B over nebula" ns_ping "$NS_A" "$NEBULA_NET.2" || {
        skip nebula "no connectivity A -> B over nebula"
        return 1
    }
    CPU_PIDS=("${OTHER_PIDS[@]}")
    RELAY_PID=''
    run_path nebula "$NEBULA_NET.2"
}

# ------------------------------------------------------------------ tinc --

# tinc_node NAME ADDR UNDERLAY PEER: the configuration directory of node NAME
# (router mode, its key made here), its host file with Address and Subnet.
tinc_node() {
    local d="$WORK/tinc/$1"
    mkdir -p "$d/hosts"
    printf 'Name = %s\nConnectTo = %s\nAddressFamily = ipv4\nInterface = tinc0\nMode = router\nPort = %s\n' \
        "$1" "$4" "$TINC_PORT" >"$d/tinc.conf"
    printf 'Address = %s\nSubnet = %s/32\nPort = %s\n' "$3" "$2" "$TINC_PORT" >"$d/hosts/$1"
    # shellcheck disable=SC2016 # $INTERFACE is tincd's, expanded when it runs the script
    printf '#!/bin/sh\nip addr add %s/24 dev "$INTERFACE"\nip link set "$INTERFACE" mtu 1420 up\n' \
        "$2" >"$d/tinc-up"
    chmod 755 "$d/tinc-up"
    tincd -c "$d" -K2048 </dev/null >>"$WORK/tinc-keys.log" 2>&1
}

bench_tinc() {
    step "Path 6: tinc $(tincd --version 2>/dev/null | awk 'NR == 1 {print $3}'), round $ROUND"
    if [[ -n ${WHY[tinc]:-} ]]; then
        info "skipped: ${WHY[tinc]}"
        return 1
    fi
    local t="$WORK/tinc" name
    if [[ ! -s $t/b/hosts/a ]]; then
        if ! { tinc_node a "$TINC_NET.1" "$A_IP" b && tinc_node b "$TINC_NET.2" "$B_IP" a; } ||
            ! grep -q 'BEGIN RSA PUBLIC KEY' "$t/a/hosts/a" "$t/b/hosts/b"; then
            skip tinc "tincd -K could not make the keys (see tinc-keys.log)"
            return 1
        fi
        cp "$t/a/hosts/a" "$t/b/hosts/a"
        cp "$t/b/hosts/b" "$t/a/hosts/b"
    fi
    for name in a b; do
        spawn "$(ns "$name")" "$WORK/tinc-$name.log" tincd -c "$t/$name" -D -d1 \
            --pidfile="$t/$name/tincd.pid"
        OTHER_PIDS+=("$LAST_PID")
        WAIT_WATCH_PID=$LAST_PID wait_until 15 "tincd in $name to bring up tinc0" \
            ip -n "$(ns "$name")" addr show dev tinc0 || {
            skip tinc "tincd in $name did not start (see tinc-$name.log)"
            return 1
        }
    done
    wait_until 30 "A -> B over tinc" ns_ping "$NS_A" "$TINC_NET.2" || {
        skip tinc "no connectivity A -> B over tinc"
        return 1
    }
    CPU_PIDS=("${OTHER_PIDS[@]}")
    RELAY_PID=''
    run_path tinc "$TINC_NET.2"
}

# ------------------------------------------------------------------- run --

for ((ROUND = 1; ROUND <= BENCH_ROUNDS; ROUND++)); do
    step "Round $ROUND of $BENCH_ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    want veth && { bench_veth || true; }
    if want mesh; then
        bench_mesh mesh || true
        if want mesh-vxlan; then bench_vxlan || true; fi
        if want relay-quic || want relay-tcp; then bench_relay || true; fi
        mesh_stop
    fi
    if want mesh-base; then
        bench_mesh mesh-base || true
        mesh_stop
        MESH_BIN=$OWN_MESH_BIN
        CTL_BIN=$OWN_CTL_BIN
    fi
    if want mesh-nooffload; then
        bench_mesh mesh-nooffload || true
        mesh_stop
    fi
    if want mesh-v6; then
        bench_mesh_v6 || true
        mesh_stop
        underlay_v6_down
    fi
    if want boringtun; then
        bench_boringtun || true
        wg_stop
    fi
    if want wireguard-go; then
        bench_wggo || true
        wg_stop
    fi
    if want nebula; then
        bench_nebula || true
        other_stop
    fi
    if want tinc; then
        bench_tinc || true
        other_stop
    fi
done

# ----------------------------------------------------------------- table --

# stats FORMAT VALUE...: "median min max" in FORMAT (nothing without values).
stats() {
    local fmt="$1"
    shift
    [[ $# -gt 0 ]] || return 0
    printf '%s\n' "$@" | sort -g | awk -v f="$fmt" '{ v[NR] = $1 } END {
        m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf f " " f " " f "\n", m, v[1], v[NR] }'
}
median() { # FORMAT VALUE... -> the median alone
    local r
    r=$(stats "$@")
    printf '%s' "${r%% *}"
}
# The lists are space-separated numbers, split on purpose below.
# shellcheck disable=SC2086
mbit() { median %.1f ${MBITS[$1/$2]:-}; }
# shellcheck disable=SC2086
rtt() { median %.3f ${RTT[$1]:-}; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f %%", 100 * a / b }'; }

# rate_cell PATH STREAMS: "median (min-max)" in Mbit/s, or "-".
rate_cell() {
    local st med lo hi
    # shellcheck disable=SC2086
    st=$(stats %.0f ${MBITS[$1/$2]:-})
    if [[ -z $st ]]; then
        printf -- '-'
    else
        read -r med lo hi <<<"$st"
        printf '%s (%s-%s)' "$med" "$lo" "$hi"
    fi
}

step "Results: TCP A -> B, iperf3, ${BENCH_SECONDS}s per run, medians over $BENCH_ROUNDS round(s)"
row_fmt='    %-15s'
hdr=(path)
sep=(---------------)
for n in "${STREAMS[@]}"; do
    row_fmt+=' %20s'
    if [[ $n -eq 1 ]]; then hdr+=("1 stream Mbit/s"); else hdr+=("$n streams Mbit/s"); fi
    sep+=(--------------------)
done
row_fmt+=' %8s %7s %7s %8s %9s'
hdr+=("CPU s/GB" "relay" "RTT ms" "+RTT ms" "mesh/path")
sep+=(-------- ------- ------- -------- ---------)
# shellcheck disable=SC2059 # the format is built above
printf "$row_fmt\n" "${hdr[@]}"
# shellcheck disable=SC2059
printf "$row_fmt\n" "${sep[@]}"
veth_rtt=$(rtt veth)
mesh_1=$(mbit mesh 1)
for path in $ALL_PATHS; do
    want "$path" || continue
    row=("$path")
    any=0
    for n in "${STREAMS[@]}"; do
        row+=("$(rate_cell "$path" "$n")")
        [[ -z ${MBITS[$path/$n]:-} ]] || any=1
    done
    # shellcheck disable=SC2086
    cpu=$(median %.2f ${CPU[$path]:-})
    # shellcheck disable=SC2086
    rcpu=$(median %.2f ${RELAY_CPU[$path]:-})
    r=$(rtt "$path")
    d=''
    [[ -z $r || -z $veth_rtt ]] || d=$(awk -v a="$r" -v b="$veth_rtt" 'BEGIN { printf "%+.3f", a - b }')
    m=''
    p1=$(mbit "$path" 1)
    [[ -z $mesh_1 || -z $p1 ]] || m=$(ratio "$mesh_1" "$p1")
    row+=("${cpu:--}" "${rcpu:--}" "${r:--}" "${d:--}" "${m:--}")
    # shellcheck disable=SC2059
    line=$(printf "$row_fmt" "${row[@]}")
    if [[ $any -eq 0 ]]; then
        line+="   (${WHY[$path]:-not measured})"
    elif [[ -n ${WHY[$path]:-} ]]; then
        line+="   (partly: ${WHY[$path]})"
    fi
    printf '%s\n' "$line"
done
echo
info "Mbit/s: the receiver's rate, median (min-max) over the rounds. CPU s/GB: user+system"
info "seconds of the two endpoints' tunnel processes (A's and B's mesh agent, boringtun-cli,"
info "wireguard-go, nebula, tincd) per 10^9 bytes moved, in the 1-stream run; relay: that of the"
info "controller (which embeds the relay) on the relay paths, not included in CPU s/GB. RTT: median"
info "of 50 idle pings 20 ms apart; +RTT: minus veth's. mesh/path: mesh's 1-stream median over"
info "the path's."
echo
# The ratios of the medians that issue 18 asks for.
for n in "${STREAMS[@]}"; do
    m=$(mbit mesh "$n")
    [[ -n $m ]] || continue
    for path in wireguard-go boringtun nebula tinc; do
        p=$(mbit "$path" "$n")
        [[ -z $p ]] || printf '    mesh / %s, %s stream(s): %s\n' "$path" "$n" "$(ratio "$m" "$p")"
    done
    p=$(mbit veth "$n")
    [[ -z $p ]] || printf '    mesh / veth, %s stream(s): %s\n' "$n" "$(pct "$m" "$p")"
    p=$(mbit mesh-base "$n")
    [[ -z $p ]] || printf '    mesh / mesh-base (this build over the one in MESH_BASE_DIR), %s stream(s): %s\n' \
        "$n" "$(ratio "$m" "$p")"
    p=$(mbit mesh-nooffload "$n")
    [[ -z $p ]] || printf '    mesh / mesh-nooffload (what TUN offloads bring), %s stream(s): %s\n' \
        "$n" "$(ratio "$m" "$p")"
    p=$(mbit mesh-vxlan "$n")
    [[ -z $p ]] || printf '    mesh-vxlan (TCP over VXLAN on mesh0) carries %s of mesh, %s stream(s)\n' \
        "$(pct "$p" "$m")" "$n"
    for path in relay-quic relay-tcp; do
        p=$(mbit "$path" "$n")
        [[ -z $p ]] || printf '    %s carries %s of the direct path, %s stream(s)\n' "$path" "$(pct "$p" "$m")" "$n"
    done
    p=$(mbit mesh-v6 "$n")
    [[ -z $p ]] || printf '    mesh-v6 (IPv6 underlay) carries %s of mesh over IPv4, %s stream(s)\n' \
        "$(pct "$p" "$m")" "$n"
done
r=$(rtt mesh)
if [[ -n $r && -n $veth_rtt ]]; then
    printf '    mesh adds %s ms of RTT to veth (%s against %s ms)\n' \
        "$(awk -v a="$r" -v b="$veth_rtt" 'BEGIN { printf "%.3f", a - b }')" "$r" "$veth_rtt"
fi
info "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

REPORTED=1
# Logs of the paths that were skipped, so that the reason is visible.
for path in $ALL_PATHS; do
    if ! want "$path" || [[ -z ${WHY[$path]:-} ]]; then continue; fi
    for f in "$WORK/$path"-*.log "$WORK/iperf-$path.err"; do
        [[ -s $f ]] || continue
        printf '%s----- %s (last 25 lines) -----%s\n' "$_C_BOLD" "$(basename "$f")" "$_C_OFF"
        tail -n 25 "$f"
    done
done

[[ ${#MBITS[@]} -gt 0 ]] || die "no path could be measured"
# The baselines are optional; mesh is what is being measured.
if want mesh && [[ -z $(mbit mesh "${STREAMS[0]}") ]]; then
    die "mesh could not be measured: ${WHY[mesh]:-unknown reason}"
fi
