# shellcheck shell=bash
#
# Shared helpers for demo.sh and benches/tunnel.sh: network namespaces,
# a bridge "switch", background processes tracked by PID, polling with a
# deadline, Debian package installation and cleanup on exit.
#
# Source it, then call `lib_init PREFIX` once. Everything created through
# these helpers (namespaces, processes, files) is registered and removed by
# `lib_cleanup`, which `lib_init` installs as the EXIT trap (INT, TERM, HUP
# and PIPE are turned into an exit so that the same path runs on Ctrl-C).
#
# Callers may define `lib_on_exit RC` to add their own reporting before the
# cleanup starts (for example to print logs when RC is non-zero).

# ---------------------------------------------------------------- output --

if [[ -t 1 ]]; then
    _C_BOLD=$'\e[1m' _C_RED=$'\e[31m' _C_GREEN=$'\e[32m' _C_YELLOW=$'\e[33m' _C_OFF=$'\e[0m'
else
    _C_BOLD='' _C_RED='' _C_GREEN='' _C_YELLOW='' _C_OFF=''
fi

# step TEXT: a heading for one stage of a script.
step() { printf '\n%s==> %s%s\n' "$_C_BOLD" "$*" "$_C_OFF"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %s%s%s\n' "$_C_GREEN" "$*" "$_C_OFF"; }
warn() { printf '    %swarning:%s %s\n' "$_C_YELLOW" "$_C_OFF" "$*" >&2; }
die() {
    printf '%serror:%s %s\n' "$_C_RED" "$_C_OFF" "$*" >&2
    exit 1
}
# Coloured words for summaries.
green() { printf '%s%s%s' "$_C_GREEN" "$*" "$_C_OFF"; }
red() { printf '%s%s%s' "$_C_RED" "$*" "$_C_OFF"; }

have() { command -v "$1" >/dev/null 2>&1; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "this script needs root (network namespaces, TUN devices); run it with sudo"
}

# ------------------------------------------------------------- registry --

LIB_PREFIX=''
LIB_NAMESPACES=()
LIB_PIDS=()
LIB_PATHS=()
LIB_CLEANED=0

# lib_init PREFIX: remember the namespace prefix of this run, reap leftovers
# of earlier runs that died without cleaning up, install the traps.
LIB_OUT=1
LIB_ERR=2
lib_init() {
    LIB_PREFIX="$1-$$-"
    # Keep the script's own stdout/stderr: an EXIT trap that fires while a
    # redirected command runs (e.g. Ctrl-C during `cmd >/dev/null`) would
    # otherwise inherit that redirection.
    exec {LIB_OUT}>&1 {LIB_ERR}>&2
    lib_reap_stale "$1"
    trap 'lib_exit_trap' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    trap 'exit 141' PIPE
}

# Namespaces are named BASE-PID-SHORT. Delete those whose PID is gone.
lib_reap_stale() {
    local base="$1" ns pid
    while read -r ns _; do
        [[ $ns == "$base"-* ]] || continue
        pid="${ns#"$base"-}"
        pid="${pid%%-*}"
        [[ $pid =~ ^[0-9]+$ ]] || continue
        if ! kill -0 "$pid" 2>/dev/null; then
            info "removing stale namespace $ns (from an earlier run)"
            _ns_kill_all "$ns"
            ip netns del "$ns" 2>/dev/null || true
        fi
    done < <(ip netns list 2>/dev/null)
}

# ns NAME: the full namespace name for a short name.
ns() { printf '%s%s' "$LIB_PREFIX" "$1"; }

register_path() { LIB_PATHS+=("$@"); }

lib_exit_trap() {
    local rc=$?
    trap - EXIT TERM HUP
    exec 1>&"$LIB_OUT" 2>&"$LIB_ERR"
    # Ignore further Ctrl-C and a closed output pipe so that cleanup is
    # not cut short.
    trap '' INT PIPE
    if declare -F lib_on_exit >/dev/null; then
        lib_on_exit "$rc" || true
    fi
    lib_cleanup
    exit "$rc"
}

# Kill every process still running inside a namespace (safety net for
# processes that were not started through `spawn`, e.g. daemonised ones).
_ns_kill_all() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null) || return 0
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    sleep 0.5
    pids=$(ip netns pids "$1" 2>/dev/null) || return 0
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

lib_cleanup() {
    [[ $LIB_CLEANED -eq 0 ]] || return 0
    LIB_CLEANED=1
    local pid n i
    for ((i = ${#LIB_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${LIB_PIDS[i]}"
    done
    LIB_PIDS=()
    for n in "${LIB_NAMESPACES[@]}"; do
        _ns_kill_all "$n"
    done
    for n in "${LIB_NAMESPACES[@]}"; do
        ip netns del "$n" 2>/dev/null || true
    done
    LIB_NAMESPACES=()
    for n in "${LIB_PATHS[@]}"; do
        [[ -n $n && $n != / ]] && rm -rf -- "$n"
    done
    LIB_PATHS=()
}

# ------------------------------------------------------------- processes --

LAST_PID=''

# spawn NS LOGFILE CMD...: run CMD in namespace NS in the background with
# stdout/stderr to LOGFILE; its PID is registered and left in LAST_PID.
# `ip netns exec` execs the command, so the PID is the command's own.
spawn() {
    local netns="$1" log="$2"
    shift 2
    ip netns exec "$netns" "$@" </dev/null >"$log" 2>&1 {LIB_OUT}>&- {LIB_ERR}>&- &
    LAST_PID=$!
    LIB_PIDS+=("$LAST_PID")
}

pid_alive() { kill -0 "$1" 2>/dev/null; }

# stop_pid PID [SECONDS]: SIGTERM, wait up to SECONDS (default 5), SIGKILL.
stop_pid() {
    local pid="$1" secs="${2:-5}" deadline i
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + secs))
        while pid_alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if pid_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    for i in "${!LIB_PIDS[@]}"; do
        [[ ${LIB_PIDS[i]} == "$pid" ]] && unset 'LIB_PIDS[i]'
    done
    LIB_PIDS=("${LIB_PIDS[@]}")
    return 0
}

# wait_until SECONDS DESCRIPTION CMD...: run CMD every 0.2 s until it
# succeeds (returns 0) or SECONDS have passed (prints a message, returns 1).
# If the variable WAIT_WATCH_PID is set and that process dies, give up early.
wait_until() {
    local secs="$1" what="$2" start now
    shift 2
    start=${EPOCHREALTIME/[.,]/}
    while true; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n ${WAIT_WATCH_PID:-} ]] && ! pid_alive "$WAIT_WATCH_PID"; then
            warn "gave up waiting for $what: process $WAIT_WATCH_PID exited"
            return 1
        fi
        now=${EPOCHREALTIME/[.,]/}
        if (((now - start) / 1000000 >= secs)); then
            warn "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------- namespaces, links --

# ns_add NAME: create a namespace (full name) with loopback up.
ns_add() {
    ip netns add "$1" || die "cannot create network namespace $1"
    LIB_NAMESPACES+=("$1")
    ip -n "$1" link set lo up
}

# switch_add NS: create NS holding a bridge br0 that plays the switch.
switch_add() {
    ns_add "$1"
    ip -n "$1" link add br0 type bridge
    ip -n "$1" link set br0 up
}

_LIB_PORTS=0

# switch_port SWITCH_NS NS IFNAME ADDR/PREFIX: connect NS to the switch by
# a veth pair (IFNAME inside NS, the peer enslaved to br0) and address it.
switch_port() {
    local sw="$1" netns="$2" ifname="$3" addr="$4" port
    _LIB_PORTS=$((_LIB_PORTS + 1))
    port="port$_LIB_PORTS"
    ip link add "$ifname" netns "$netns" type veth peer name "$port" netns "$sw" ||
        die "cannot create veth pair for $netns"
    ip -n "$sw" link set "$port" master br0
    ip -n "$sw" link set "$port" up
    ip -n "$netns" addr add "$addr" dev "$ifname"
    ip -n "$netns" link set "$ifname" up
}

# veth_link NS1 IF1 ADDR1 NS2 IF2 ADDR2: a direct veth pair between two
# namespaces, both ends addressed and up.
veth_link() {
    ip link add "$2" netns "$1" type veth peer name "$5" netns "$4" ||
        die "cannot create veth pair $1/$2 - $4/$5"
    ip -n "$1" addr add "$3" dev "$2"
    ip -n "$4" addr add "$6" dev "$5"
    ip -n "$1" link set "$2" up
    ip -n "$4" link set "$5" up
}

# ns_ping NS ADDR: one quick ICMP echo from NS to ADDR.
ns_ping() { ip netns exec "$1" ping -n -q -c 1 -W 1 "$2" >/dev/null 2>&1; }

# udp_listening NS PORT: something in NS has bound UDP PORT.
udp_listening() { [[ -n $(ip netns exec "$1" ss -Hnlu "sport = :$2" 2>/dev/null) ]]; }
tcp_listening() { [[ -n $(ip netns exec "$1" ss -Hnlt "sport = :$2" 2>/dev/null) ]]; }

# ---------------------------------------------------------------- debian --

_LIB_APT_UPDATED=0

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# apt_ensure PKG...: install the packages that are missing; `apt-get update`
# runs at most once per script run. Returns non-zero if installation failed.
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    have apt-get || {
        warn "apt-get not found; please install: ${missing[*]}"
        return 1
    }
    info "installing Debian packages: ${missing[*]}"
    if [[ $_LIB_APT_UPDATED -eq 0 ]]; then
        _LIB_APT_UPDATED=1
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null ||
            warn "apt-get update failed; trying to install anyway"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        warn "apt-get install ${missing[*]} failed"
        return 1
    }
}

# find_cargo: make sure `cargo` is on PATH (rustup installs to ~/.cargo/bin,
# which sudo often drops from PATH).
find_cargo() {
    have cargo && return 0
    local d
    for d in "${CARGO_HOME:-}/bin" "$HOME/.cargo/bin" "/root/.cargo/bin"; do
        if [[ -x $d/cargo ]]; then
            PATH="$d:$PATH"
            return 0
        fi
    done
    return 1
}

# show_logs DIR: print the tail of every *.log in DIR.
show_logs() {
    local f
    for f in "$1"/*.log; do
        [[ -e $f ]] || continue
        printf '\n%s----- %s (last 40 lines) -----%s\n' "$_C_BOLD" "$(basename "$f")" "$_C_OFF"
        tail -n 40 "$f"
    done
}
