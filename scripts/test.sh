#!/usr/bin/env bash
# The test command: installs what the tests need (when run as root on Debian), then runs every
# test of the workspace and prints one closing line with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup, stable >= 1.88) first" >&2
    exit 1
fi

# python3 runs the independent HBONE peer of the interop tests (interop/h2_peer.py); iproute2,
# iptables and nftables are for the network-namespace tests of the capture rules.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    for pkg in iproute2 iptables nftables util-linux; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    command -v python3 >/dev/null || need+=(python3 python3-pip)
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi
# The interop peer's HTTP/2 library (pure Python), for whichever python3 is first on PATH.
if ! python3 -c "import h2" 2>/dev/null; then
    python3 -m pip install --quiet h2 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages h2
fi
python3 -c "import h2" || { echo "cannot install the Python package h2 for the interop tests" >&2; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: every failing test binary shows, and the closing line counts them all.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries and doc-tests.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
