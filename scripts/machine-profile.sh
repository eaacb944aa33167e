#!/usr/bin/env bash
# Where the whole machine's time goes while the benchmark harness runs one load through each proxy
# pair: `perf record -a -g` (every CPU, every process, the kernel included) for SECS seconds in the
# middle of that load, once per proxy, in one harness run (../shared/bench/compare.sh, one round).
# Outside CI (needs root, perf, python3, iperf3 and the harness's tools).
#
#   scripts/machine-profile.sh iperf|crr PROXY...
#   e.g. ZTUNNEL_BIN=/path/istio/ztunnel OUR_ZTUNNEL=target/dist/ztunnel \
#          scripts/machine-profile.sh iperf ztunnel project
#
# iperf: the harness's one-stream iperf3 test (run for 4 x SECS seconds here). crr: its sequential
# connect + 1 byte echo + close test (CRR_N connections, enough for about 3 x SECS seconds).
# For each proxy it prints: the share of all CPUs each process had (`swapper` is idle time); for
# the two busiest processes that are not the harness's tools (the proxy pair), the functions their samples landed
# in and the system calls those samples were under; and the harness's rate for the load. perf in a
# virtual machine without a PMU samples on a timer: time with interrupts off (packets handed
# between network namespaces, wake-ups) lands on the function that turns them back on
# (`_raw_spin_unlock_irqrestore`, `handle_softirqs`).
# Env: BENCH (harness dir, default ../shared/bench), SECS (default 6), OUT (default a new temp dir),
# CRR_N (crr: default 12000), REPORT_ONLY=1 (report an earlier run's OUT again, without running),
# STRACE=1 (instead of perf: count each proxy process's system calls with `strace -f -c` for SECS
# seconds, and print them per GiB that crossed the veth between the pods meanwhile (iperf) or per
# connection (crr); strace slows the proxies, so read the counts, not the rate);
# the harness's own (ZTUNNEL_BIN, OUR_ZTUNNEL, ...) pass through.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOAD="${1:-}"; shift || true
[ $# -gt 0 ] || { echo "usage: $0 iperf|crr PROXY..." >&2; exit 2; }
: "${BENCH:=$REPO/../shared/bench}" "${SECS:=6}" "${OUT:=$(mktemp -d)}" "${CRR_N:=12000}"
BENCH="$(cd "$BENCH" && pwd)"
TOOLS=(perf python3); [ -n "${STRACE:-}" ] && TOOLS=(strace python3)
for t in "${TOOLS[@]}"; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
case "$LOAD" in
  iperf) MATCH='iperf3 -c .* -P 1 '; TUNE=(TPUT_SECS=$((4 * SECS)) CRR_N=200) ;;
  crr) MATCH='bench.py crr .* 1$'; TUNE=(TPUT_SECS=1 CRR_N="$CRR_N") ;;
  *) echo "load: iperf or crr" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
PROXIES=("$@")

# STRACE=1: both sides' proxy processes (whatever runs in the harness's namespaces but its tools)
# under `strace -f -c` for SECS seconds, and the bytes the server pod's veth received meanwhile.
NS_A="${NS_A:-hbb-a}" NS_B="${NS_B:-hbb-b}"
veth_rx() {
  ip -n "$NS_B" -s -j link show | python3 -c 'import json, sys
print(sum(l["stats64"]["rx"]["bytes"] for l in json.load(sys.stdin) if l["ifname"] != "lo"))'
}
trace() {
  local ns pid rx0
  rx0=$(veth_rx)
  for ns in "$NS_A" "$NS_B"; do
    for pid in $(ip netns pids "$ns"); do
      grep -qE '^(iperf3|python3|sleep|strace|timeout|bash|perf)$' "/proc/$pid/comm" 2>/dev/null && continue
      timeout -s INT "$SECS" strace -f -c -o "$OUT/$1.$([ "$ns" = "$NS_A" ] && echo a || echo b).$pid.strace" \
        -p "$pid" >/dev/null 2>&1 &
    done
  done
  wait
  echo $(( $(veth_rx) - rx0 )) > "$OUT/$1.veth-bytes"
}
# The watcher: the n-th time the load starts is the n-th proxy's turn (one round, in order).
watch() {
  local n=0 pid
  while [ $n -lt ${#PROXIES[@]} ]; do
    pid=$(pgrep -f "$MATCH" | head -1 || true)
    if [ -n "$pid" ]; then
      sleep 0.5
      if [ -n "${STRACE:-}" ]; then trace "${PROXIES[$n]}"; else
        perf record -a -g -o "$OUT/${PROXIES[$n]}.data" -- sleep "$SECS" >/dev/null 2>&1
      fi
      n=$((n + 1))
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    sleep 0.05
  done
}
if [ -z "${REPORT_ONLY:-}" ]; then
  watch & WATCHER=$!
  trap 'kill $WATCHER 2>/dev/null || true' EXIT
  env ROUNDS=1 RATE_SECS=1 RR_N=500 HOLD_N=0 CRR_CONC_N=200 "${TUNE[@]}" OUT="$OUT/harness" \
    "$BENCH/compare.sh" "${PROXIES[@]}" > "$OUT/harness.log" 2>&1 \
    || { tail -20 "$OUT/harness.log" >&2; exit 1; }
  # A recording may outlast the harness by a few seconds; a load that never started must not
  # keep the watcher (and this script) waiting.
  for _ in $(seq $((SECS * 10 + 30))); do kill -0 $WATCHER 2>/dev/null || break; sleep 0.1; done
  kill $WATCHER 2>/dev/null || true
fi

# The harness's own rows for the load (one round, so each proxy's value is that round's).
harness_rows() {
  case "$LOAD" in
    iperf) grep -E '^\| (iperf3 1 stream|proxy CPU ms per Gbit)' "$OUT/harness/results.md" | head -2 ;;
    crr) grep -E '^\| connect\+1 B echo\+close, sequential, conn/s' "$OUT/harness/results.md" | head -1 ;;
  esac
}
if [ -n "${STRACE:-}" ]; then
  for p in "${PROXIES[@]}"; do
    ls "$OUT/$p".*.strace >/dev/null 2>&1 || { echo "no system calls for $p (did its load run?)" >&2; exit 1; }
    echo "=== $p"; harness_rows
    for f in "$OUT/$p".*.strace; do
      python3 - "$f" "$OUT/$p.veth-bytes" "$LOAD" "$SECS" <<'PY'
import sys
path, moved, load, secs = sys.argv[1], int(open(sys.argv[2]).read()), sys.argv[3], float(sys.argv[4])
side = path.rsplit(".", 3)[1]
calls, failed = {}, {}
for line in open(path):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls[f[-1]] = int(f[3])
        failed[f[-1]] = int(f[4]) if len(f) == 6 else 0
total = sum(calls.values())
if load == "iperf":
    unit, per = "GiB through the tunnel", moved / 2**30
else:
    # A connection is one accept that succeeded on the client side, one connect (to the app) on
    # the server side.
    unit = "connection"
    ok = lambda name: calls.get(name, 0) - failed.get(name, 0)
    per = ok("accept4") + ok("accept") if side == "a" else calls.get("connect", 0)
if not per:
    sys.exit(f"{path}: nothing moved while traced")
moved_note = f"{moved / 2**30:.2f} GiB crossed the veth in {secs:g} s, " if load == "iperf" else ""
print(f"  {'client' if side == 'a' else 'server'} side: {moved_note}system calls per {unit}: {total / per:,.0f}")
for name, n in sorted(calls.items(), key=lambda kv: -kv[1])[:10]:
    print(f"    {n / per:10,.1f}  {name}" + (f" ({failed[name] / per:,.1f} failed)" if failed[name] else ""))
PY
    done
  done
  echo "system call counts and the harness run: $OUT"
  exit 0
fi
for p in "${PROXIES[@]}"; do
  [ -s "$OUT/$p.data" ] || { echo "no profile for $p (did its load run?)" >&2; exit 1; }
  echo "=== $p"; harness_rows
  perf script -i "$OUT/$p.data" -F pid,comm,ip,sym 2>/dev/null | python3 -c '
import collections, re, sys
blocks = sys.stdin.read().split("\n\n")
share = collections.Counter(); leaf = collections.defaultdict(collections.Counter)
names = collections.defaultdict(collections.Counter)
under = collections.defaultdict(collections.Counter); total = 0
for b in blocks:
    lines = [l.strip() for l in b.strip().split("\n") if l.strip()]
    if not lines:
        continue
    head = lines[0].rsplit(None, 1)            # "comm [with spaces] pid"
    if len(head) != 2 or not head[1].isdigit():
        continue
    comm, pid = head; total += 1; share[pid] += 1; names[pid][comm] += 1
    syms = [l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "?" for l in lines[1:]]
    leaf[pid][re.sub(r"\s*\(.*\)$", "", syms[0]) if syms else "?"] += 1
    # The system call: the frame inside do_syscall_64 (the entry may be inlined into it).
    call = "(no system call: user space, interrupts, scheduling)"
    if "do_syscall_64" in syms:
        i = syms.index("do_syscall_64")
        if i > 0:
            call = re.sub(r"^(__x64_sys_|__do_sys_|__se_sys_|__sys_|ksys_|do_)", "", syms[i - 1])
    under[pid][call] += 1
name = lambda pid: "idle" if pid == "0" else "/".join(c for c, _ in names[pid].most_common(3))
print("share of all CPUs, by process (idle is the CPUs halted):")
for pid, n in share.most_common(8):
    print(f"  {100 * n / total:5.1f}%  {name(pid)} ({pid})")
tools = re.compile(r"^(swapper|python3|iperf3|perf|ksoftirqd|kworker|kdamond|rcu_|migration)")
proxies = [(p, n) for p, n in share.most_common() if p != "0" and not tools.match(names[p].most_common(1)[0][0])]
for pid, n in proxies[:2]:
    print(f"{name(pid)} ({pid}), {100 * n / total:.1f}% of all CPUs; its samples by function:")
    for s, k in leaf[pid].most_common(12):
        print(f"  {100 * k / n:5.1f}%  {s}")
    print("  ... by the system call they were under:")
    for s, k in under[pid].most_common(10):
        print(f"  {100 * k / n:5.1f}%  {s}")
'
done
echo "profiles and the harness run: $OUT"
