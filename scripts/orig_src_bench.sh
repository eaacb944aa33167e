#!/usr/bin/env bash
# What calling the app from the client's address costs (issue 29): sequential new connections
# from sleep to web-api's /whoami through the local mesh (HBONE between the two nodes, the app
# called by web-api's node proxy), with the proxies' default (ENABLE_ORIG_SRC=true: a transparent
# socket bound to the client's address) and with ENABLE_ORIG_SRC=false (the pod's own address),
# one mesh after the other in one run. Root; after `cargo build --release -p ztunnel`.
#
# Usage: N=2000 ROUNDS=3 scripts/orig_src_bench.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
Z="${Z:-$REPO/target/release/ztunnel}"
N="${N:-2000}" ROUNDS="${ROUNDS:-3}"
RUN="$(mktemp -d)"
L=("$Z" local --prefix zob --subnet 10.236 --run-dir "$RUN/mesh")
trap '"${L[@]}" down >/dev/null 2>&1 || true; rm -rf "$RUN"' EXIT
CLIENT="import socket, time
t = time.perf_counter()
for _ in range($N):
    s = socket.create_connection(('web-api', 8080), timeout=5)
    s.sendall(b'GET /whoami HTTP/1.1\r\nhost: web-api\r\nconnection: close\r\n\r\n')
    body = b''
    while True:
        b = s.recv(4096)
        if not b: break
        body += b
    s.close()
    assert b'remote=' in body, body
print('%.1f' % ($N / (time.perf_counter() - t)))"
for round in $(seq "$ROUNDS"); do
  for orig in true false; do
    ENABLE_ORIG_SRC=$orig "${L[@]}" up >/dev/null 2>&1
    "${L[@]}" label namespace default istio.io/dataplane-mode=ambient >/dev/null 2>&1
    for _ in $(seq 100); do
      "${L[@]}" status | grep -q "default/web-api-0 .*: captured certificate" && \
        "${L[@]}" status | grep -q "default/sleep-0 .*: captured certificate" && break
      sleep 0.2
    done
    "${L[@]}" exec sleep -- "$Z" local get http://web-api:8080/whoami >/dev/null
    rate=$("${L[@]}" exec sleep -- python3 -c "$CLIENT")
    echo "round $round ENABLE_ORIG_SRC=$orig: $rate connections/s ($N sequential, /whoami through HBONE)"
    "${L[@]}" down >/dev/null 2>&1
  done
done
