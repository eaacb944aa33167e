# Shared by the interop scripts that run a mixed pair (ours and another implementation) through the
# side-by-side benchmark harness. Needs BENCH (the harness directory) and WORK (a scratch directory).

# NAME CLIENT_CMD SERVER_CMD: one round of the harness's whole test list through the pair; the
# harness's output and results go to $WORK/NAME.
run_pair() {
  OURS_DESCRIPTION="$1" OURS_CLIENT_CMD="$2" OURS_SERVER_CMD="$3" ROUNDS=1 OUT="$WORK/$1" \
    bash "$BENCH/compare.sh" ours >"$WORK/$1.log" 2>&1 || { cat "$WORK/$1.log" >&2; exit 1; }
}

FAILED=0
# FILE PATTERN WHAT: PASS if FILE contains PATTERN, else FAIL (and the script will exit 1).
expect() {
  if grep -q "$2" "$1"; then echo "PASS: $3"; else echo "FAIL: $3 (no '$2' in $1)"; FAILED=1; fi
}

# NAME...: a few rows of each pair's results, and the errors the harness recorded.
summarize() {
  for d in "$@"; do
    echo "--- $d"
    grep -E '^\| (iperf3 1 stream, Gbit/s|1 KiB RR back-to-back, p50|connect\+1 B echo\+close, sequential, conn/s) ' \
      "$WORK/$d/results.md" | head -3
    sed -n '/^## Errors/,$p' "$WORK/$d/results.md"
  done
}

# NETNS TOKEN ROOT INPOD_UDS RUST_LOG COMMAND...: runs COMMAND (a node proxy, ours or Istio's) in
# NETNS with the environment Istio's ztunnel chart gives it, against a control plane on
# 127.0.0.1:15012 (FAKE_CA for Istio's), the node's TOKEN and the mesh ROOT at the chart's mount
# paths (tmpfs in a private mount namespace), taking pods from INPOD_UDS. Runs in the foreground:
# callers redirect it and put it in the background.
chart_proxy() {
  local netns="$1" token="$2" root="$3" uds="$4" log="$5"; shift 5
  ip netns exec "$netns" unshare --mount --propagation private bash -c '
    mkdir -p /var/run/secrets/tokens /var/run/secrets/istio
    mount -t tmpfs tmpfs /var/run/secrets/tokens && cp "$1" /var/run/secrets/tokens/istio-token
    mount -t tmpfs tmpfs /var/run/secrets/istio && cp "$2" /var/run/secrets/istio/root-cert.pem
    uds="$3" log="$4"; shift 4
    # Istio'"'"'s defaults are relative to the working directory, which is / in its image.
    cd /
    exec env -i PATH=/usr/bin:/bin HOME=/root RUST_LOG="$log" \
      XDS_ADDRESS=127.0.0.1:15012 CA_ADDRESS=127.0.0.1:15012 FAKE_CA=true \
      ISTIO_META_CLUSTER_ID=Kubernetes NODE_NAME=node-a POD_NAME=ztunnel-x POD_NAMESPACE=istio-system \
      INSTANCE_IP=127.0.0.1 SERVICE_ACCOUNT=ztunnel INPOD_ENABLED=true \
      INPOD_UDS="$uds" ZTUNNEL_WORKER_THREADS=1 "$@"' _ "$token" "$root" "$uds" "$log" "$@"
}
