#!/usr/bin/env bash
# Runs every mesh test: formatting, lints, unit tests, the in-process simulation and the
# end-to-end tests in network namespaces (real binaries, real TUN). Needs root (namespaces, TUN).
# Installs what it needs from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the end-to-end tests create network namespaces and TUN devices; run as root (sudo ./test.sh)" >&2
    exit 1
fi

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v setpriv >/dev/null || need+=(util-linux)
command -v nft >/dev/null || need+=(nftables)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v python3 >/dev/null || need+=(python3)
# The node-name tests ask each node's responder with dig.
command -v dig >/dev/null || need+=(bind9-dnsutils)
# The reference CNI plugins (bridge, host-local, portmap) make pods in the CNI test; Debian
# installs them to /usr/lib/cni.
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
# The shipped units are checked with systemd-analyze verify (nothing is started).
command -v systemd-analyze >/dev/null || need+=(systemd)
# A 3-member etcd cluster runs over the overlay in the path quality test (nothing starts on the
# host: the test runs etcd by PID in namespaces).
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
# The port mapping tests run miniupnpd in a lab router. This package is the daemon alone: no
# service, nothing starts on the host (the `miniupnpd` package would add the service).
command -v miniupnpd >/dev/null || [ -x /usr/sbin/miniupnpd ] || need+=(miniupnpd-nftables)
# The controller's rules also run on PostgreSQL: the tests start Debian's server themselves
# (initdb in a temporary directory, as the postgres user, loopback only) and stop it. The
# package's own cluster is not used.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun; }

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build binaries"
cargo build --workspace --bins --quiet
echo "== tests"
MESH_BIN_DIR="$PWD/target/debug" cargo test --workspace -- --test-threads="${MESH_TEST_THREADS:-2}"
echo "== the controller's rules on PostgreSQL"
MESH_TEST_DATABASE=postgres cargo test -p mesh-controller --lib -- --test-threads="${MESH_TEST_THREADS:-2}"
echo "== leftovers"
left=$(ip netns list | grep -c . || true)
if [ "$left" -ne 0 ]; then
    echo "tests left network namespaces behind:" >&2
    ip netns list >&2
    exit 1
fi
echo "all tests passed"
