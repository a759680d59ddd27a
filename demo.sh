#!/usr/bin/env bash
#
# mesh demo: one controller and three agents, each in its own network
# namespace on a shared bridge, all on this machine. Builds mesh, brings the
# mesh up, shows status, pings every agent from every other agent over the
# overlay, then removes everything it created.
#
#   sudo ./demo.sh                      # release build (default)
#   sudo MESH_PROFILE=debug ./demo.sh   # debug build
#
# Exit status is non-zero if any step or any ping fails. Process logs are
# written to a temporary directory and printed when something goes wrong.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=benches/lib-netns.sh
. "$ROOT/benches/lib-netns.sh"

MESH_PROFILE=${MESH_PROFILE:-release}
case $MESH_PROFILE in
release) BUILD_FLAGS=(--release --bins) ;;
debug) BUILD_FLAGS=(--bins) ;;
*) die "MESH_PROFILE must be 'release' or 'debug' (got '$MESH_PROFILE')" ;;
esac
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$MESH_PROFILE"
MESH="$BIN_DIR/mesh"
CTL="$BIN_DIR/mesh-controller"

NETWORK=demo
OVERLAY_CIDR=100.64.0.0/16
CTL_IP=192.0.2.1
CTL_PORT=7443
NODES=(node-a node-b node-c)
declare -A UNDERLAY=([node-a]=192.0.2.11 [node-b]=192.0.2.12 [node-c]=192.0.2.13)
declare -A NETNS=() PID=() OVERLAY=()

WORK=''
lib_on_exit() {
    local rc=$1
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -eq 0 ]]; then
            register_path "$WORK"
        elif [[ $rc -eq 130 || $rc -eq 141 || $rc -eq 143 ]]; then
            printf '\nInterrupted.\n'
            register_path "$WORK"
        else
            step "Process logs (the demo failed with status $rc)"
            show_logs "$WORK"
            printf '\nLogs and state directories are kept in %s\n' "$WORK"
        fi
    fi
    step "Tearing down: stopping processes, deleting namespaces"
}

# ------------------------------------------------------------------------

step "Checking prerequisites"
require_root
lib_init meshdemo
apt_ensure iproute2 iputils-ping || die "iproute2 and iputils-ping are required"
[[ -e /dev/net/tun ]] || die "/dev/net/tun does not exist (load the tun module: modprobe tun)"
find_cargo || die "cargo not found: install Rust (https://rustup.rs) and re-run"
if ! have cc; then
    apt_ensure gcc libc6-dev || die "a C compiler is needed to build some dependencies"
fi
ok "root, iproute2, ping, $(cargo --version)"

WORK=$(mktemp -d /tmp/mesh-demo.XXXXXX)
info "logs and state go to $WORK"

step "Building mesh ($MESH_PROFILE): cargo build ${BUILD_FLAGS[*]}"
(cd "$ROOT" && cargo build "${BUILD_FLAGS[@]}") || die "cargo build failed"
[[ -x $MESH && -x $CTL ]] || die "the build did not produce $MESH and $CTL"
ok "built $MESH and $CTL"

step "Creating network namespaces on a bridge (underlay 192.0.2.0/24)"
NS_SW=$(ns switch)
NS_CTL=$(ns controller)
switch_add "$NS_SW"
ns_add "$NS_CTL"
switch_port "$NS_SW" "$NS_CTL" eth0 "$CTL_IP/24"
info "$(printf '%-11s %-16s %s' controller "$CTL_IP" "$NS_CTL")"
for n in "${NODES[@]}"; do
    NETNS[$n]=$(ns "$n")
    ns_add "${NETNS[$n]}"
    switch_port "$NS_SW" "${NETNS[$n]}" eth0 "${UNDERLAY[$n]}/24"
    info "$(printf '%-11s %-16s %s' "$n" "${UNDERLAY[$n]}" "${NETNS[$n]}")"
done
for n in "${NODES[@]}"; do
    wait_until 10 "underlay $n -> controller" ns_ping "${NETNS[$n]}" "$CTL_IP" ||
        die "no underlay connectivity from $n"
done
ok "underlay is up"

step "Starting the controller on $CTL_IP:$CTL_PORT"
mkdir -p "$WORK/controller"
spawn "$NS_CTL" "$WORK/controller.log" "$CTL" serve --listen "$CTL_IP:$CTL_PORT" --state-dir "$WORK/controller"
PID[controller]=$LAST_PID
# Ready once its UDP socket is bound and it has written listen.addr (which
# `token create` embeds into the token).
controller_ready() {
    udp_listening "$NS_CTL" "$CTL_PORT" && [[ -s $WORK/controller/listen.addr ]]
}
WAIT_WATCH_PID=$LAST_PID wait_until 20 "the controller to listen on udp/$CTL_PORT" \
    controller_ready || die "mesh-controller serve did not start"
ok "mesh-controller serve running (pid ${PID[controller]})"

# ctl_cmd LOGNAME ARGS...: run a controller subcommand in its namespace,
# its stdout goes to our stdout, its stderr (appended) to WORK/LOGNAME.log.
ctl_cmd() {
    local log="$WORK/$1.log"
    shift
    echo "\$ mesh-controller $*" >>"$log"
    ip netns exec "$NS_CTL" "$CTL" "$@" --state-dir "$WORK/controller" 2>>"$log"
}

step "Creating network '$NETWORK' ($OVERLAY_CIDR), its network id and a reusable join token"
ctl_cmd network-create network create "$NETWORK" --cidr "$OVERLAY_CIDR" >/dev/null ||
    die "mesh-controller network create failed"
NETWORK_ID=$(ctl_cmd network-id network id "$NETWORK") || die "mesh-controller network id failed"
NETWORK_ID=${NETWORK_ID//[[:space:]]/}
ok "network id: ${NETWORK_ID:0:28}... (no secret in it; nodes that join with it wait for approval)"
TOKEN=$(ctl_cmd token-create token create "$NETWORK" --reusable --expires 1h) ||
    die "mesh-controller token create failed"
TOKEN=${TOKEN//[[:space:]]/}
[[ -n $TOKEN ]] || die "mesh-controller token create printed no token"
ok "token: ${TOKEN:0:24}... (${#TOKEN} characters)"
info "$(tail -n 1 "$WORK/token-create.log")"

ASKER=${NODES[${#NODES[@]}-1]}
step "Starting three agents: the token for all but $ASKER, which joins by network id"
# The token in a file only root can read: on a command line, every local user could read it.
(umask 077 && printf '%s\n' "$TOKEN" >"$WORK/token")
for n in "${NODES[@]}"; do
    mkdir -p "$WORK/$n"
    if [[ $n == "$ASKER" ]]; then
        spawn "${NETNS[$n]}" "$WORK/$n.log" "$MESH" join "$NETWORK_ID" --name "$n" --state-dir "$WORK/$n"
        info "$n: mesh join meshnet1_... --name $n (pid $LAST_PID)"
    else
        spawn "${NETNS[$n]}" "$WORK/$n.log" "$MESH" join --token-file "$WORK/token" --name "$n" --state-dir "$WORK/$n"
        info "$n: mesh join --token-file FILE --name $n (pid $LAST_PID)"
    fi
    PID[$n]=$LAST_PID
done

# asker_pending: the controller lists the asking node as waiting for approval.
asker_pending() {
    ctl_cmd node-pending node pending "$NETWORK" 2>/dev/null | grep -q "^$ASKER "
}
step "$ASKER waits for approval: mesh-controller node pending $NETWORK"
WAIT_WATCH_PID=${PID[$ASKER]} wait_until 30 "$ASKER's join request" asker_pending ||
    die "$ASKER's join request did not reach the controller"
ctl_cmd node-pending node pending "$NETWORK" | sed 's/^/    /'
ctl_cmd node-approve node approve "$NETWORK" "$ASKER" | sed 's/^/    /' ||
    die "mesh-controller node approve failed"
ok "approved $ASKER"

# overlay_ready NODE: `mesh ip` answers and mesh0 carries that address.
overlay_ready() {
    local ip
    ip=$(ip netns exec "${NETNS[$1]}" "$MESH" ip --state-dir "$WORK/$1" 2>/dev/null) || return 1
    ip=${ip//[[:space:]]/}
    [[ -n $ip ]] || return 1
    ip -n "${NETNS[$1]}" -4 addr show dev mesh0 2>/dev/null | grep -qF "inet $ip/" || return 1
    OVERLAY[$1]=$ip
}

step "Waiting for the agents to join and configure mesh0"
for n in "${NODES[@]}"; do
    WAIT_WATCH_PID=${PID[$n]} wait_until 30 "$n to get its overlay address" overlay_ready "$n" ||
        die "$n did not come up"
    ok "$n: mesh0 has ${OVERLAY[$n]}"
done

step "Nodes known to the controller: mesh-controller node list $NETWORK"
ctl_cmd node-list node list "$NETWORK" | sed 's/^/    /' || die "mesh-controller node list failed"

step "Waiting until every agent reaches every other one (up to 30s)"
deadline=$((SECONDS + 30))
for src in "${NODES[@]}"; do
    for dst in "${NODES[@]}"; do
        [[ $src != "$dst" ]] || continue
        left=$((deadline - SECONDS))
        ((left > 0)) || left=1
        wait_until "$left" "$src -> $dst" ns_ping "${NETNS[$src]}" "${OVERLAY[$dst]}" || true
    done
done

step "Agent status: mesh status on node-a"
ip netns exec "${NETNS[node-a]}" "$MESH" status --state-dir "$WORK/node-a" 2>>"$WORK/node-a-status.log" |
    sed 's/^/    /' || die "mesh status failed"

step "Ping test over the overlay (ping -c 3)"
failed=0
total=0
for src in "${NODES[@]}"; do
    for dst in "${NODES[@]}"; do
        [[ $src != "$dst" ]] || continue
        total=$((total + 1))
        log="$WORK/ping-$src-$dst.log"
        if ip netns exec "${NETNS[$src]}" ping -n -c 3 -i 0.3 -W 2 "${OVERLAY[$dst]}" >"$log" 2>&1; then
            rx=$(sed -n 's/.* \([0-9]*\) received.*/\1/p' "$log")
            avg=$(sed -n 's|^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*|\1|p' "$log")
            printf '    %s -> %s %-15s %s (%s/3 replies, avg %s ms)\n' "$src" "$dst" "${OVERLAY[$dst]}" "$(green ok)" "${rx:-?}" "${avg:-?}"
            rm -f "$log" # keep only the logs of failed pings
        else
            failed=$((failed + 1))
            printf '    %s -> %s %-15s %s\n' "$src" "$dst" "${OVERLAY[$dst]}" "$(red FAILED)"
        fi
    done
done

step "Summary"
if ((failed > 0)); then
    printf '    %s: %d of %d pings failed\n' "$(red FAILED)" "$failed" "$total"
    exit 1
fi
printf '    %s: all %d paths between 3 agents work over the mesh\n' "$(green SUCCESS)" "$total"
