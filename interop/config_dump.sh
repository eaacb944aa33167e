#!/usr/bin/env bash
# /config_dump against Istio's ztunnel for the same state (outside CI: it needs Istio's ztunnel built
# from its public source, with --features testing for FAKE_CA).
#
# Our control plane serves one cluster's workloads, services and policies (manifests below) in a
# network namespace made here. Istio's ztunnel, then ours, run there in shared mode with the
# environment Istio's chart gives (XDS_ADDRESS, POD_NAME, ..., the node's token mounted at the
# projected token's path in a private mount namespace) and take that state over xDS; each one's
# /config_dump is saved, and every workload, service and policy is compared key by key: every key
# Istio's ztunnel writes must be in ours with the same value (ours may add keys). Exit 0: the same.
#
# Usage (root, from this repository's root, after `cargo build --release -p ztunnel`):
#   ZTUNNEL_BIN=/path/to/istio/ztunnel interop/config_dump.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${ZTUNNEL_BIN:?set ZTUNNEL_BIN to the Istio ztunnel binary, built with --features testing}"
: "${OUR_BIN:=$REPO/target/release/ztunnel}"
WORK="$(mktemp -d /tmp/config-dump-XXXX)"
NS="cdump-$$"
cleanup() {
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  sleep 0.5
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
source "$REPO/interop/lib.sh"
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }

mkdir -p "$WORK/manifests"
cat >"$WORK/manifests/cluster.yaml" <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node-a}
status: {podIP: 10.244.0.7, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web, version: v1}}
spec: {serviceAccountName: web, nodeName: node-a}
status: {podIP: 10.244.0.10, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web, version: v1}}
spec: {serviceAccountName: web, nodeName: node-b}
status: {podIP: 10.244.1.11, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: node-b}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 9090}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"], namespaces: ["default"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["192.0.2.0/24"], notNamespaces: ["default"]}}]
EOF

echo "control plane in $NS"
ip netns exec "$NS" "$OUR_BIN" controlplane --manifests "$WORK/manifests" --listen 127.0.0.1:15012 \
  --tls-name 127.0.0.1 >"$WORK/controlplane.log" 2>&1 &
CONTROLPLANE=$!
for _ in $(seq 50); do [ -f "$WORK/manifests/.node-tokens/node-a.token" ] && break; sleep 0.2; done
ROOT="$WORK/manifests/.ca/root-cert.pem"
TOKEN="$WORK/manifests/.node-tokens/node-a.token"

# NAME COMMAND...: runs a proxy with the chart's environment, the node's token and the root at
# Istio's mount paths (a private mount namespace), saves its /config_dump once it holds the state,
# and stops it.
dump() {
  local name="$1"; shift
  chart_proxy "$NS" "$TOKEN" "$ROOT" "/tmp/$NS.sock" info env TERMINATION_GRACE_PERIOD_SECONDS=6 "$@" \
    >"$WORK/$name.log" 2>&1 &
  disown
  for _ in $(seq 100); do
    if in_ns curl -sf http://127.0.0.1:15000/config_dump -o "$WORK/$name.json" 2>/dev/null &&
       python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if len(d.get("workloads",[]))>=4 and len(d.get("policies",[]))>=2 else 1)' "$WORK/$name.json"; then
      break
    fi
    sleep 0.2
  done
  # Everything in the namespace but the control plane is this proxy.
  ip netns pids "$NS" | grep -vx "$CONTROLPLANE" | xargs -r kill -9 2>/dev/null || true
  sleep 1
  [ -s "$WORK/$name.json" ] || { echo "no dump from $name; its log:"; tail -20 "$WORK/$name.log"; exit 1; }
}
dump istio "$ZTUNNEL_BIN"
dump ours "$OUR_BIN" proxy ztunnel

python3 - "$WORK/istio.json" "$WORK/ours.json" <<'EOF'
import json, sys
istio, ours = (json.load(open(p)) for p in sys.argv[1:3])
keys = {"workloads": lambda w: w["uid"], "services": lambda s: s["namespace"] + "/" + s["hostname"],
        "policies": lambda p: p["namespace"] + "/" + p["name"]}
failed = 0
for section, key in keys.items():
    theirs = {key(x): x for x in istio[section]}
    mine = {key(x): x for x in ours[section]}
    for name in sorted(set(theirs) | set(mine)):
        if name not in mine:
            print(f"FAIL {section} {name}: only in Istio's dump"); failed += 1; continue
        if name not in theirs:
            print(f"FAIL {section} {name}: only in ours"); failed += 1; continue
        for k, v in theirs[name].items():
            if mine[name].get(k) != v:
                print(f"FAIL {section} {name} {k}: Istio's {json.dumps(v)}, ours {json.dumps(mine[name].get(k))}")
                failed += 1
        extra = sorted(set(mine[name]) - set(theirs[name]))
        print(f"{'ok  ' if not failed else '    '}{section} {name}" + (f" (ours adds {extra})" if extra else ""))
for section in ("certificates", "version", "config"):
    print(f"{section}: Istio's keys {sorted(istio.get(section) or [] if isinstance(istio.get(section), dict) else [])}")
print(f"{failed} differences")
sys.exit(1 if failed else 0)
EOF
echo "dumps kept in $WORK"
