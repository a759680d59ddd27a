#!/usr/bin/env bash
#
# TCP throughput through mesh compared with plain veth and two other
# userspace WireGuard implementations (boringtun-cli, wireguard-go), and
# through mesh's relay: over QUIC (direct UDP between the nodes blocked) and
# over TCP (all UDP of the nodes blocked), as ratios to the direct path; and
# mesh over an IPv6 underlay (the same links with 2001:db8:: addresses, a
# controller reached over IPv6). See benches/README.md. Needs root; everything runs in throwaway network
# namespaces that are removed on exit.
#
# Environment:
#   BENCH_SECONDS   length of each iperf3 run in seconds (default 10)
#   BENCH_PATHS     paths to measure, space separated
#                   (default "veth mesh relay-quic relay-tcp mesh-v6 boringtun
#                   wireguard-go"; the relay paths need mesh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib-netns.sh
. "$HERE/lib-netns.sh"

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_PATHS=${BENCH_PATHS:-veth mesh relay-quic relay-tcp mesh-v6 boringtun wireguard-go}
[[ $BENCH_SECONDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer (got '$BENCH_SECONDS')"

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

declare -A MBITS=() WHY=()
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
if want mesh || want mesh-v6; then
    if find_cargo; then
        info "building mesh: cargo build --release --bins"
        if ! (cd "$ROOT" && cargo build --release --bins); then
            skip mesh "cargo build --release --bins failed"
            skip mesh-v6 "cargo build --release --bins failed"
        elif [[ ! -x $MESH_BIN || ! -x $CTL_BIN ]]; then
            skip mesh "the build did not produce $MESH_BIN and $CTL_BIN"
            skip mesh-v6 "the build did not produce $MESH_BIN and $CTL_BIN"
        fi
    else
        skip mesh "cargo not found, cannot build mesh"
        skip mesh-v6 "cargo not found, cannot build mesh"
    fi
fi

info "kernel $(uname -r), $(nproc) CPUs: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
info "$(iperf3 --version | head -n 1); each run lasts ${BENCH_SECONDS}s (+1s omitted warm-up)"

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

# measure PATH ADDRESS: iperf3 A -> ADDRESS, store Mbit/s in MBITS[PATH].
measure() {
    local path="$1" dst="$2" json="$WORK/iperf-$1.json" bps err
    info "iperf3 -c $dst -t $BENCH_SECONDS ($path)"
    if timeout --foreground $((BENCH_SECONDS + 30)) ip netns exec "$NS_A" \
        iperf3 -c "$dst" -p "$IPERF_PORT" -t "$BENCH_SECONDS" -O 1 --connect-timeout 5000 -J \
        >"$json" 2>"$WORK/iperf-$path.err"; then
        bps=$(jq -r '.end.sum_received.bits_per_second // empty' "$json")
        if [[ -n $bps ]]; then
            MBITS[$path]=$(awk -v b="$bps" 'BEGIN { printf "%.1f", b / 1e6 }')
            ok "$path: ${MBITS[$path]} Mbit/s"
            return 0
        fi
    fi
    err=$(jq -r '.error // empty' "$json" 2>/dev/null || true)
    skip "$path" "iperf3 failed: ${err:-$(tail -n 3 "$WORK/iperf-$path.err" "$json" 2>/dev/null | tr '\n' ' ')}"
    return 1
}

# ------------------------------------------------------------------ veth --

bench_veth() {
    step "Path 1: plain veth (baseline)"
    measure veth "$B_IP"
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
# overlay address in PAIR_IP_B. Failures are skipped as PATH (logs carry
# PATH's name, so that a skipped path shows them).
mesh_pair() {
    local path="$1" sd="$2" listen="$3" token ip_b name netns
    mkdir -p "$sd/ctl" "$sd/a" "$sd/b"

    spawn "$NS_C" "$WORK/$path-controller.log" "$CTL_BIN" serve --listen "$listen" --state-dir "$sd/ctl"
    MESH_PIDS+=("$LAST_PID")
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
        spawn "$netns" "$WORK/$path-agent-$name.log" "$MESH_BIN" join "$token" --name "bench-$name" \
            --port "$MESH_PORT" --state-dir "$sd/$name"
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
    ip_b=$(mesh_overlay_ready "$NS_B" "$sd/b")
    info "overlay: A=$(mesh_overlay_ready "$NS_A" "$sd/a") B=$ip_b, mesh0 MTU $(ip -n "$NS_A" -o link show mesh0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
    wait_until 30 "A -> B over mesh" ns_ping "$NS_A" "$ip_b" || {
        skip "$path" "no connectivity A -> B over the overlay"
        return 1
    }
    PAIR_IP_B=$ip_b
}

bench_mesh() {
    step "Path 2: mesh (controller + two agents)"
    if [[ -n ${WHY[mesh]:-} ]]; then
        info "skipped: ${WHY[mesh]}"
        return 1
    fi
    mesh_pair mesh "$WORK/mesh" "$CTL_IP:$CTL_PORT" || return 1
    measure mesh "$PAIR_IP_B"
    MESH_IP_B=$PAIR_IP_B
    MESH_SD=$WORK/mesh
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

bench_relay() {
    step "Path 2b: mesh through the controller's relay, over QUIC and over TCP"
    if [[ -z ${MESH_IP_B:-} ]]; then
        skip relay-quic "mesh was not measured"
        skip relay-tcp "mesh was not measured"
        return 1
    fi
    if want relay-quic; then
        block_udp direct
        if wait_until 20 "A -> B on the relay" on_relay; then
            wait_until 10 "A -> B over the relay" ns_ping "$NS_A" "$MESH_IP_B" || true
            measure relay-quic "$MESH_IP_B" || true
        else
            skip relay-quic "the pair did not move to the relay"
        fi
        unblock_udp
    fi
    if want relay-tcp; then
        block_udp all
        if wait_until 30 "both agents on TCP" both_on_tcp && wait_until 20 "A -> B on the relay" on_relay; then
            wait_until 10 "A -> B over the relay" ns_ping "$NS_A" "$MESH_IP_B" || true
            measure relay-tcp "$MESH_IP_B" || true
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
    step "Path 2c: mesh over an IPv6 underlay (controller at [$CTL_IP6]:$CTL_PORT)"
    if [[ -n ${WHY[mesh-v6]:-} ]]; then
        info "skipped: ${WHY[mesh-v6]}"
        return 1
    fi
    underlay_v6 || {
        skip mesh-v6 "the IPv6 underlay did not come up"
        return 1
    }
    local sd="$WORK/mesh-v6"
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
    measure mesh-v6 "$PAIR_IP_B" || true
    unblock_udp4_direct
}

# --------------------------------------------------- userspace WireGuard --

WG_PIDS=()

wg_stop() {
    local i
    for ((i = ${#WG_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${WG_PIDS[i]}"; done
    WG_PIDS=()
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
    measure "$path" "$net.2"
}

bench_boringtun() {
    step "Path 3: boringtun-cli $("$BORINGTUN" --version 2>/dev/null | awk '{print $2}')"
    if [[ -n ${WHY[boringtun]:-} ]]; then
        info "skipped: ${WHY[boringtun]}"
        return 1
    fi
    bench_wg boringtun 100.100.1 "$BORINGTUN" --foreground --disable-drop-privileges \
        --log "$WORK/boringtun-internal.out"
}

bench_wggo() {
    step "Path 4: wireguard-go $(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || true)"
    if [[ -n ${WHY[wireguard-go]:-} ]]; then
        info "skipped: ${WHY[wireguard-go]}"
        return 1
    fi
    bench_wg wireguard-go 100.100.2 wireguard-go -f
}

# ------------------------------------------------------------------- run --

want veth && { bench_veth || true; }
if want mesh; then
    bench_mesh || true
    if want relay-quic || want relay-tcp; then bench_relay || true; fi
    mesh_stop
fi
if want mesh-v6; then
    bench_mesh_v6 || true
    mesh_stop
fi
if want boringtun; then
    bench_boringtun || true
    wg_stop
fi
if want wireguard-go; then
    bench_wggo || true
    wg_stop
fi

# ----------------------------------------------------------------- table --

step "Results: TCP A -> B, iperf3, ${BENCH_SECONDS}s"
printf '    %-14s %12s %14s\n' path "Mbit/s" "mesh/path"
printf '    %-14s %12s %14s\n' -------------- ------------ --------------
for path in veth mesh relay-quic relay-tcp mesh-v6 boringtun wireguard-go; do
    want "$path" || continue
    if [[ -n ${MBITS[$path]:-} ]]; then
        if [[ -n ${MBITS[mesh]:-} ]]; then
            ratio=$(awk -v m="${MBITS[mesh]}" -v p="${MBITS[$path]}" 'BEGIN { printf "%.2f", m / p }')
        else
            ratio=n/a
        fi
        printf '    %-14s %12s %14s\n' "$path" "${MBITS[$path]}" "$ratio"
    else
        printf '    %-14s %12s %14s   (%s)\n' "$path" "-" "-" "${WHY[$path]:-not measured}"
    fi
done
for path in relay-quic relay-tcp; do
    if [[ -n ${MBITS[$path]:-} && -n ${MBITS[mesh]:-} ]]; then
        printf '    %s carries %s of the direct path\n' "$path" \
            "$(awk -v r="${MBITS[$path]}" -v m="${MBITS[mesh]}" 'BEGIN { printf "%.0f %%", 100 * r / m }')"
    fi
done
if [[ -n ${MBITS[mesh-v6]:-} && -n ${MBITS[mesh]:-} ]]; then
    printf '    mesh-v6 (IPv6 underlay) carries %s of mesh over IPv4\n' \
        "$(awk -v r="${MBITS[mesh-v6]}" -v m="${MBITS[mesh]}" 'BEGIN { printf "%.0f %%", 100 * r / m }')"
fi
echo

REPORTED=1
# Logs of the paths that were skipped, so that the reason is visible.
for path in veth mesh relay-quic relay-tcp mesh-v6 boringtun wireguard-go; do
    if ! want "$path" || [[ -z ${WHY[$path]:-} ]]; then continue; fi
    for f in "$WORK/$path"-*.log "$WORK/iperf-$path.err"; do
        [[ -s $f ]] || continue
        printf '%s----- %s (last 25 lines) -----%s\n' "$_C_BOLD" "$(basename "$f")" "$_C_OFF"
        tail -n 25 "$f"
    done
done

[[ ${#MBITS[@]} -gt 0 ]] || die "no path could be measured"
# The baselines are optional; mesh is what is being measured.
if want mesh && [[ -z ${MBITS[mesh]:-} ]]; then
    die "mesh could not be measured: ${WHY[mesh]:-unknown reason}"
fi
