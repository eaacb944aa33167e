#!/usr/bin/env bash
# Interoperability with Istio's ztunnel, both directions, in the side-by-side benchmark harness's two
# network namespaces (outside CI: it needs Istio's ztunnel built from its public source).
#
#   1. our client-side proxy (dedicated mode) -> Istio's server-side ztunnel
#   2. Istio's client-side ztunnel -> our server-side proxy
#
# Both run the harness's whole test list (iperf3, round trips, connects) through the mixed pair, then
# the access logs are checked: each server side must log the client's SPIFFE id, and each client side
# must have verified the server's. Certificates for our side are issued (by `ztunnel ca issue`) from
# the test root of Istio's FAKE_CA, read from the Istio checkout at run time, so both sides share a root.
#
# Usage (root, from this repository's root, after `cargo build --release -p ztunnel`):
#   ISTIO_SRC=/path/to/istio-ztunnel-checkout ZTUNNEL_BIN=/path/to/istio/ztunnel interop/istio_ztunnel.sh
# Istio's binary must be built with `--features testing` (FAKE_CA); see ../shared/bench/README.md.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${ISTIO_SRC:?set ISTIO_SRC to a checkout of Istio's ztunnel (for its FAKE_CA test root)}"
: "${ZTUNNEL_BIN:?set ZTUNNEL_BIN to Istio's ztunnel built with --features testing}"
: "${BENCH:=$REPO/../shared/bench}" "${OUR_BIN:=$REPO/target/release/ztunnel}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
IP_A=10.78.0.1 IP_B=10.78.0.2

# Our certificates, from Istio's test root.
mkdir -p "$WORK/ca"
cp "$ISTIO_SRC/src/tls/root-cert.pem" "$WORK/ca/root-cert.pem"
install -m 600 "$ISTIO_SRC/src/tls/ca-key.pem" "$WORK/ca/root-key.pem"
for sa in client server; do
  "$OUR_BIN" ca issue --dir "$WORK/ca" --id "spiffe://cluster.local/ns/default/sa/$sa" --ttl 24h --out "$WORK/$sa" >/dev/null
done

# The same two pods for both implementations: ours reads Kubernetes YAML, Istio's its local config.
cat > "$WORK/mesh.yaml" <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: $IP_A}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: default, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node-b}
status: {podIP: $IP_B}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {ports: ["5201", "8080", "8081"]}}]
EOF
BENCH_PORTS_YAML=5201,8080,8081 IP_A=$IP_A IP_B=$IP_B \
  envsubst '$IP_A $IP_B $BENCH_PORTS_YAML' < "$BENCH/proxies/ztunnel/local.yaml.tmpl" > "$WORK/local.yaml"

ours() { # SA NODE
  echo "env NODE_NAME=$2 ZTUNNEL_WORKER_THREADS=1 $OUR_BIN proxy --mode dedicated --local-manifests $WORK/mesh.yaml" \
    "--workload default/$1/$1 --cert $WORK/$1/cert-chain.pem --key $WORK/$1/key.pem --ca $WORK/$1/root-cert.pem"
}
istio() { # SA NODE
  echo "env -i PATH=/usr/bin:/bin HOME=/root RUST_LOG=info FAKE_CA=true XDS_ADDRESS= LOCAL_XDS_PATH=$WORK/local.yaml" \
    "PROXY_MODE=dedicated PROXY_WORKLOAD_INFO=default/$1/$1 NODE_NAME=$2 ENABLE_ORIG_SRC=false PACKET_MARK=1337" \
    "ZTUNNEL_WORKER_THREADS=1 $ZTUNNEL_BIN"
}
source "$REPO/interop/lib.sh"
run_pair ours-to-istio "$(ours client node-a)" "$(istio server node-b)"
run_pair istio-to-ours "$(istio client node-a)" "$(ours server node-b)"
ID=spiffe://cluster.local/ns/default/sa
expect "$WORK/ours-to-istio/run/ours/r1/server.log" "src.identity=\"$ID/client\"" \
  "Istio's server side saw our client's identity"
expect "$WORK/ours-to-istio/run/ours/r1/client.log" "mtls=true" "our client side tunneled over mTLS"
expect "$WORK/istio-to-ours/run/ours/r1/server.log" "src.identity=\"$ID/client\"" \
  "our server side saw Istio's client's identity"
expect "$WORK/istio-to-ours/run/ours/r1/client.log" "dst.identity=\"$ID/server\"" \
  "Istio's client side verified our server's identity"
summarize ours-to-istio istio-to-ours
exit $FAILED
