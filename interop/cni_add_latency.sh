#!/usr/bin/env bash
# How long a new pod waits in its CNI ADD: `ztunnel-cni` invoked as a container runtime invokes
# it, for N fresh pod namespaces one after another, with our node agent and, as the node proxy
# acknowledging each pod, our `ztunnel proxy` and then Istio's ztunnel (side by side, one run).
# Outside CI (Istio's ztunnel comes from its public source, built with --features testing).
#
# Usage (root, from this repository's root, after
# `cargo build --release -p ztunnel -p ztunnel-cni`):
#   ZTUNNEL_BIN=/path/to/istio/ztunnel N=30 interop/cni_add_latency.sh
# Prints one line per proxy: p50, p90 and max of the ADD's wall time, in milliseconds.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${ZTUNNEL_BIN:?set ZTUNNEL_BIN to the Istio ztunnel binary, built with --features testing}"
: "${OUR_BIN:=$REPO/target/release/ztunnel}" "${CNI_BIN:=$REPO/target/release/ztunnel-cni}" "${N:=30}"
WORK="$(mktemp -d /tmp/cni-latency-XXXX)"
NODE="cnil-$$"
cleanup() {
  ip netns pids "$NODE" 2>/dev/null | xargs -r kill 2>/dev/null || true
  sleep 0.5
  for i in $(seq "$N"); do ip netns del "cnil-$$-$i" 2>/dev/null || true; done
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NODE"
ip -n "$NODE" link set lo up
in_node() { ip netns exec "$NODE" "$@"; }
source "$REPO/interop/lib.sh"

mkdir -p "$WORK/cp" "$WORK/agent"
printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n' \
  >"$WORK/cp/mesh.yaml"
for i in $(seq "$N"); do
  printf -- '---\napiVersion: v1\nkind: Pod\nmetadata: {name: p%s, namespace: default, uid: uid-p%s}\nspec: {serviceAccountName: p%s, nodeName: node-a}\n' \
    "$i" "$i" "$i" >>"$WORK/cp/mesh.yaml"
done
cp "$WORK/cp/mesh.yaml" "$WORK/agent/mesh.yaml"
in_node "$OUR_BIN" controlplane --manifests "$WORK/cp" --listen 127.0.0.1:15012 \
  --tls-name 127.0.0.1 >"$WORK/controlplane.log" 2>&1 &
for _ in $(seq 50); do [ -f "$WORK/cp/.node-tokens/node-a.token" ] && break; sleep 0.2; done
ROOT="$WORK/cp/.ca/root-cert.pem" TOKEN="$WORK/cp/.node-tokens/node-a.token"

proxy() { # ours|istio
  local bin=("$OUR_BIN" proxy ztunnel)
  [ "$1" = istio ] && bin=("$ZTUNNEL_BIN" proxy ztunnel)
  chart_proxy "$NODE" "$TOKEN" "$ROOT" "$WORK/ztunnel.sock" warn "${bin[@]}" \
    >"$WORK/proxy-$1.log" 2>&1 &
}

measure() { # ours|istio
  rm -f "$WORK/ztunnel.sock" "$WORK/cni.sock"
  in_node "$OUR_BIN" node-agent --source "manifests:$WORK/agent" --node node-a --backend nftables \
    --zds-socket "$WORK/ztunnel.sock" --cni-socket "$WORK/cni.sock" >"$WORK/agent-$1.log" 2>&1 &
  for _ in $(seq 50); do [ -S "$WORK/cni.sock" ] && break; sleep 0.1; done
  proxy "$1"
  for _ in $(seq 100); do in_node ss -Hxl | grep -q "$WORK/ztunnel.sock" && break; sleep 0.1; done
  sleep 2
  local config='{"cniVersion":"1.0.0","name":"k8s","type":"ztunnel-cni","agent_socket":"'"$WORK/cni.sock"'","prevResult":{"cniVersion":"1.0.0","ips":[]}}'
  : >"$WORK/times-$1"
  for i in $(seq "$N"); do
    local ns="cnil-$$-$i"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    local start end
    start=$(date +%s%N)
    env -i CNI_COMMAND=ADD CNI_CONTAINERID="c$i" CNI_NETNS="/var/run/netns/$ns" CNI_IFNAME=eth0 \
      CNI_PATH=/opt/cni/bin CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=p$i" \
      "$CNI_BIN" <<<"$config" >/dev/null || { echo "ADD failed for p$i ($1)"; tail -5 "$WORK/agent-$1.log"; exit 1; }
    end=$(date +%s%N)
    echo $(((end - start) / 1000)) >>"$WORK/times-$1"
  done
  # Stop this round's agent and proxy (the control plane stays), and drop the pods.
  ip netns pids "$NODE" | while read -r pid; do
    grep -q 'controlplane' "/proc/$pid/cmdline" 2>/dev/null || kill "$pid" 2>/dev/null || true
  done
  sleep 1
  for i in $(seq "$N"); do ip netns del "cnil-$$-$i" 2>/dev/null || true; done
  sort -n "$WORK/times-$1" | awk -v who="$1" '{ a[NR] = $1 } END {
    printf "%-6s ADD wall time over %d pods: p50 %.1f ms, p90 %.1f ms, max %.1f ms\n",
      who, NR, a[int(NR * 0.5 + 0.5)] / 1000, a[int(NR * 0.9 + 0.5)] / 1000, a[NR] / 1000 }'
}
measure ours
measure istio
