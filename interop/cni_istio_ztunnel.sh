#!/usr/bin/env bash
# Our node agent's CNI path with Istio's ztunnel as the node proxy (outside CI: it needs Istio's
# ztunnel built from its public source, with --features testing for FAKE_CA).
#
# A network namespace stands for the node: our control plane (TLS, as istiod), our node agent
# (`--zds-socket`, `--cni-socket`) and Istio's ztunnel in shared mode with the environment
# Istio's chart gives, taking pods from our agent's ZDS socket. Another namespace is a pod,
# joined to the node by a veth. `ztunnel-cni` is invoked as a container runtime invokes it:
#
#   1. ADD before Istio's ztunnel runs: it must not return (the pod's rules are in, nobody
#      serves the pod);
#   2. Istio's ztunnel starts: the ADD returns success, and Istio's ztunnel listens in the pod
#      (15001, 15006, 15008): our agent waited for its acknowledgement;
#   3. a DNS query from the pod to any address on port 53 is captured (our rules) and answered
#      by Istio's ztunnel's DNS proxy with the service's address;
#   4. DEL: our rules leave the pod and Istio's ztunnel stops serving it.
#
# Usage (root, from this repository's root, after
# `cargo build --release -p ztunnel -p ztunnel-cni`):
#   ZTUNNEL_BIN=/path/to/istio/ztunnel interop/cni_istio_ztunnel.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${ZTUNNEL_BIN:?set ZTUNNEL_BIN to the Istio ztunnel binary, built with --features testing}"
: "${OUR_BIN:=$REPO/target/release/ztunnel}" "${CNI_BIN:=$REPO/target/release/ztunnel-cni}"
WORK="$(mktemp -d /tmp/cni-interop-XXXX)"
NODE="cnin-$$" POD="cnip-$$"
cleanup() {
  ip netns pids "$NODE" 2>/dev/null | xargs -r kill 2>/dev/null || true
  sleep 0.5
  ip netns del "$POD" 2>/dev/null || true
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NODE"
ip netns add "$POD"
ip -n "$NODE" link set lo up
ip -n "$POD" link set lo up
ip -n "$NODE" link add "v$$" type veth peer name eth0 netns "$POD"
ip -n "$NODE" addr add 10.79.0.1/24 dev "v$$"
ip -n "$NODE" link set "v$$" up
ip -n "$POD" addr add 10.79.0.2/24 dev eth0
ip -n "$POD" link set eth0 up
in_node() { ip netns exec "$NODE" "$@"; }
source "$REPO/interop/lib.sh"

FAILED=0
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; FAILED=1; }
serves() { ip netns exec "$POD" ss -Hltn | grep -q ':15008 '; }

# What the control plane serves (the pod with its address) and what the agent's source lists at
# sandbox time (scheduled, no address yet: only the runtime's word says where the pod is).
mkdir -p "$WORK/cp" "$WORK/agent"
cat >"$WORK/cp/mesh.yaml" <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, uid: uid-web, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node-a}
status: {podIP: 10.79.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.9.9, selector: {app: web}, ports: [{port: 80}]}
EOF
grep -v podIP "$WORK/cp/mesh.yaml" >"$WORK/agent/mesh.yaml"

in_node "$OUR_BIN" controlplane --manifests "$WORK/cp" --listen 127.0.0.1:15012 \
  --tls-name 127.0.0.1 >"$WORK/controlplane.log" 2>&1 &
for _ in $(seq 50); do [ -f "$WORK/cp/.node-tokens/node-a.token" ] && break; sleep 0.2; done
in_node "$OUR_BIN" node-agent --source "manifests:$WORK/agent" --node node-a --backend iptables \
  --zds-socket "$WORK/ztunnel.sock" --cni-socket "$WORK/cni.sock" >"$WORK/agent.log" 2>&1 &
for _ in $(seq 50); do [ -S "$WORK/cni.sock" ] && break; sleep 0.1; done

# 1. ADD with no proxy yet.
CONFIG='{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"ztunnel-cni","agent_socket":"'"$WORK/cni.sock"'","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.79.0.2/24"}]}}'
cni() { # COMMAND
  env -i CNI_COMMAND="$1" CNI_CONTAINERID=sandbox-web CNI_NETNS="/var/run/netns/$POD" CNI_IFNAME=eth0 \
    CNI_PATH=/opt/cni/bin CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=uid-web" \
    "$CNI_BIN" <<<"$CONFIG"
}
cni ADD >"$WORK/add.out" 2>"$WORK/add.err" &
ADD=$!
sleep 3
if kill -0 "$ADD" 2>/dev/null; then pass "ADD waits while no proxy serves the pod"; else fail "ADD returned with no proxy"; fi
if ip netns exec "$POD" iptables-save -t nat | grep -q ZTUNNEL_; then pass "the pod's rules are in"; else fail "no rules in the pod"; fi

# 2. Istio's ztunnel, as its chart runs it, taking pods from our agent.
ROOT="$WORK/cp/.ca/root-cert.pem" TOKEN="$WORK/cp/.node-tokens/node-a.token"
chart_proxy "$NODE" "$TOKEN" "$ROOT" "$WORK/ztunnel.sock" info "$ZTUNNEL_BIN" proxy ztunnel \
  >"$WORK/istio.log" 2>&1 &
if wait "$ADD"; then pass "ADD returned success once Istio's ztunnel came"; else fail "ADD failed: $(cat "$WORK/add.out")"; fi
if serves; then pass "Istio's ztunnel serves the pod when ADD returns"; else fail "ADD returned but Istio's ztunnel does not serve the pod"; fi
grep -q '10.79.0.2/24' "$WORK/add.out" && pass "ADD passed the primary plugin's result on" || fail "ADD's output: $(cat "$WORK/add.out")"
# Our DNS capture with Istio's DNS proxy: the pod asks the node's address on port 53.
ANSWER=$(ip netns exec "$POD" python3 -c '
import socket, struct
msg = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
for l in "web.default.svc.cluster.local".split("."):
    msg += bytes([len(l)]) + l.encode()
msg += b"\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(msg, ("10.79.0.1", 53)); d = s.recv(65535)
print(socket.inet_ntoa(d[-4:]) if struct.unpack(">H", d[6:8])[0] else "none")' 2>&1 || true)
if [ "$ANSWER" = 10.96.9.9 ]; then pass "our DNS capture reaches Istio's DNS proxy, which answers the service"; else fail "DNS through our capture: $ANSWER"; fi

# 3. DEL.
cni DEL >/dev/null 2>&1 && pass "DEL succeeded" || fail "DEL failed"
if ip netns exec "$POD" iptables-save -t nat | grep -q ZTUNNEL_; then fail "rules left after DEL"; else pass "DEL removed the pod's rules"; fi
for _ in $(seq 50); do serves || break; sleep 0.1; done
if serves; then fail "Istio's ztunnel still serves the pod after DEL"; else pass "Istio's ztunnel stopped serving the pod"; fi
[ "$FAILED" = 0 ] || { echo "--- agent"; tail -20 "$WORK/agent.log"; echo "--- Istio's ztunnel"; tail -30 "$WORK/istio.log"; }
exit $FAILED
