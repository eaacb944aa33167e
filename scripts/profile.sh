#!/usr/bin/env bash
# Where the proxy's cycles go: our dedicated-mode pair in two network namespaces (as the benchmark
# harness sets them up), one load at a time, under `perf record -g`; prints the top of the report
# for each side. Outside CI (needs root, perf, iperf3, python3; a release build).
#
#   scripts/profile.sh [iperf|crr|crr8|rr1000|cpu-bulk] [SECONDS]
#   scripts/profile.sh [count-rr|count-crr|count-bulk] [COUNT]
#   scripts/profile.sh order
#
# iperf: one iperf3 stream through the pair. crr: sequential connect + 1 byte echo + close.
# crr8: the same from 8 concurrent clients (a threaded echo server). rr1000: 1 KiB round trips on
# one connection at 1,000 per second (the harness's CPU row). cpu-bulk: iperf3 at a fixed rate
# (RATE per stream, default 3G; 0 for as fast as it goes) over STREAMS streams (default 1),
# without perf; prints each proxy's CPU time per GB moved.
# count-rr, count-crr, count-bulk: both proxies under valgrind's callgrind, counting the instructions each
# spends per 1 KiB round trip on one connection (count-rr) or per connect + 1 byte echo + close
# (count-crr), or per MiB sent through them and echoed back (count-bulk, COUNT MiB each way), over
# COUNT of them after a warm-up. Instruction counts do not depend on how busy
# the host is, so they show a change of a few percent that timing on a noisy machine cannot
# (kernel work is not counted; needs valgrind). Reports `callgrind_annotate` files in OUT.
# order: both proxies under callgrind from their start, through readiness, idle, connections,
# round trips and a bulk transfer (the client side starts without a policy, the server side with
# one); writes the functions they ran (linker names; the client side's start, then what the
# server side's start added, then the traffic's, each hottest first) to
# ztunnel-bin/symbol-order.txt, the list the `ztunnel` binary is linked in the order of
# (ztunnel-bin/build.rs). Run it on the shipped build (`scripts/dist.sh`, then
# `ZT=target/dist/ztunnel`): names differ between profiles, and only a static build lists the C
# library's functions.
# Env: ZT (our binary, default target/release/ztunnel), WORKERS (default 1), OUT (report dir),
# SYSCALLS=1 (iperf, crr, crr8, rr1000: count each proxy's system calls with `strace -f -c` instead of
# sampling with perf; strace slows the proxies, so read the counts, not the rate).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOAD="${1:-iperf}" SECS="${2:-10}"
COUNT=""; case "$LOAD" in count-*) COUNT="$SECS" ;; order) COUNT=1 ;; esac
# The counts include the access log (one line per connection), as the benchmark harness runs it.
LOG=warn; [ -n "$COUNT" ] && LOG=info
: "${ZT:=$REPO/target/release/ztunnel}" "${WORKERS:=1}" "${OUT:=$(mktemp -d)}"
mkdir -p "$OUT"
A=zprof-a B=zprof-b IP_A=10.77.0.1 IP_B=10.77.0.2
WORK="$(mktemp -d)"
cleanup() {
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  ip netns pids $A 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns pids $B 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cleanup 2>/dev/null || true
WORK="$(mktemp -d)"
ip netns add $A; ip netns add $B
ip link add zprofa type veth peer name zprofb
ip link set zprofa netns $A; ip link set zprofb netns $B
ip -n $A addr add $IP_A/24 dev zprofa; ip -n $B addr add $IP_B/24 dev zprofb
for n in $A $B; do ip -n $n link set lo up; done
ip -n $A link set zprofa up; ip -n $B link set zprofb up
ip netns exec $A iptables -t nat -A OUTPUT -p tcp ! -o lo -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001

"$ZT" ca init --dir "$WORK/ca" >/dev/null
for sa in sleep web-api; do
  "$ZT" ca issue --dir "$WORK/ca" --id "spiffe://cluster.local/ns/default/sa/$sa" --out "$WORK/$sa" >/dev/null
done
cat > "$WORK/mesh.yaml" <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node-a}
status: {podIP: $IP_A}
---
apiVersion: v1
kind: Pod
metadata: {name: web-api, namespace: default, labels: {app: web-api}}
spec: {serviceAccountName: web-api, nodeName: node-b}
status: {podIP: $IP_B}
EOF
# The server side's mesh adds what the benchmark harness and most meshes have: a policy allowing
# the traffic, so the policy's start-up and per-connection code is profiled (and ordered) too. The
# client side's has none: `order` lists what a proxy runs to start without a policy first, then
# what one with a policy adds, so neither kind of mesh pages in the other's start-up code.
{ cat "$WORK/mesh.yaml"; cat <<EOF
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {ports: [5201, 8080]}}]
EOF
} > "$WORK/mesh-policy.yaml"
VALGRIND=()
proxy() { # NS SA NODE MESH
  [ -n "$COUNT" ] && VALGRIND=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$OUT/$2.callgrind")
  [ "$LOAD" = order ] && VALGRIND=(valgrind --tool=callgrind --demangle=no "--callgrind-out-file=$OUT/$2.callgrind")
  ip netns exec "$1" env ${PROXY_ENV:-} ZTUNNEL_WORKER_THREADS=$WORKERS NODE_NAME="$3" RUST_LOG="$LOG" "${VALGRIND[@]}" "$ZT" proxy --mode dedicated \
    --workload "default/$2/$2" --local-manifests "$WORK/$4" --cert "$WORK/$2/cert-chain.pem" \
    --key "$WORK/$2/key.pem" --ca "$WORK/$2/root-cert.pem" --admin-addr 127.0.0.1:15000 2>"$WORK/$2.log" &
}
proxy $A sleep node-a mesh.yaml; CLIENT=$!
proxy $B web-api node-b mesh-policy.yaml; SERVER=$!
for n in $A $B; do
  for _ in $(seq 600); do ip netns exec $n python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready')" 2>/dev/null && break; sleep 0.1; done
done
if [ "$LOAD" = order ]; then
  # What ran until ready and idle is one part of the profile, the traffic's code another.
  sleep 2
  for pid in $CLIENT $SERVER; do callgrind_control -d "$pid" >/dev/null 2>&1; done
fi

case "$LOAD" in
  cpu-bulk)
    # The proxies' CPU time per byte at a fixed rate, below what saturates this machine: less
    # at the mercy of the other processes than the harness's throughput row.
    ip netns exec $B iperf3 -s -1 -p 5201 >/dev/null &
    sleep 0.3
    ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
    c0=$(ticks $CLIENT) s0=$(ticks $SERVER)
    ip netns exec $A iperf3 -c $IP_B -p 5201 -t "$SECS" -P "${STREAMS:-1}" -b "${RATE:-3G}" -J >"$OUT/load.json"
    c1=$(ticks $CLIENT) s1=$(ticks $SERVER)
    python3 - "$OUT/load.json" $((c1 - c0)) $((s1 - s0)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
end = json.load(open(sys.argv[1]))["end"]["sum_received"]
gb, hz = end["bytes"] / 1e9, int(sys.argv[4])
print(f"{end['bits_per_second'] / 1e9:.2f} Gbit/s, {gb:.2f} GB received")
for side, ticks in (("client", int(sys.argv[2])), ("server", int(sys.argv[3]))):
    print(f"{side} side: {1000 * ticks / hz / gb:.0f} ms of CPU per GB")
PY
    exit 0
    ;;
  iperf)
    ip netns exec $B iperf3 -s -1 -p 5201 >/dev/null &
    sleep 0.3
    ip netns exec $A iperf3 -c $IP_B -p 5201 -t "$SECS" >"$OUT/load.txt" &
    ;;
  crr)
    ip netns exec $B python3 -c "
import socket
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('$IP_B',8080)); l.listen(128)
while True:
  c,_=l.accept(); d=c.recv(1); c.sendall(d); c.close()" &
    sleep 0.3
    ip netns exec $A python3 -c "
import socket,time
t=time.time(); n=0
while time.time()-t < $SECS:
  s=socket.create_connection(('$IP_B',8080)); s.sendall(b'x'); s.recv(1); s.close(); n+=1
print(n/$SECS, 'conn/s')" >"$OUT/load.txt" &
    ;;
  crr8)
    ip netns exec $B python3 -c "
import socketserver
class H(socketserver.BaseRequestHandler):
  def handle(self):
    d=self.request.recv(1); self.request.sendall(d)
socketserver.ThreadingTCPServer.allow_reuse_address=True
socketserver.ThreadingTCPServer.daemon_threads=True
socketserver.ThreadingTCPServer.request_queue_size=128
socketserver.ThreadingTCPServer(('$IP_B',8080),H).serve_forever()" &
    sleep 0.3
    ip netns exec $A python3 -c "
import socket,time,multiprocessing
def run(q):
  t=time.time(); n=0
  while time.time()-t < $SECS:
    s=socket.create_connection(('$IP_B',8080)); s.sendall(b'x'); s.recv(1); s.close(); n+=1
  q.put(n)
q=multiprocessing.Queue(); ps=[multiprocessing.Process(target=run,args=(q,)) for _ in range(8)]
[p.start() for p in ps]; total=sum(q.get() for _ in ps); [p.join() for p in ps]
print(total/$SECS, 'conn/s')" >"$OUT/load.txt" &
    ;;
  rr1000)
    ip netns exec $B python3 -c "
import socket
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('$IP_B',8080)); l.listen(8)
c,_=l.accept()
while True:
  d=c.recv(65536)
  if not d: break
  c.sendall(d)" &
    sleep 0.3
    ip netns exec $A python3 -c "
import socket,time
s=socket.create_connection(('$IP_B',8080)); t=time.time(); n=0
while time.time()-t < $SECS:
  s.sendall(b'x'*1024); got=0
  while got < 1024: got+=len(s.recv(4096))
  n+=1; time.sleep(max(0,t+n/1000-time.time()))
print(n, 'round trips of 1 KiB at 1000/s')" >"$OUT/load.txt" &
    ;;
  count-rr|count-crr|count-bulk|order)
    ip netns exec $B python3 -c "
import socket,threading
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('$IP_B',8080)); l.listen(128)
def echo(c):
  while True:
    d=c.recv(65536)
    if not d: break
    c.sendall(d)
  c.close()
while True:
  c,_=l.accept(); threading.Thread(target=echo,args=(c,),daemon=True).start()" &
    sleep 0.3
    ip netns exec $A python3 -c "
import socket,subprocess,sys,threading
def rr(s,n):
  for _ in range(n):
    s.sendall(b'x'*1024); got=0
    while got < 1024: got+=len(s.recv(4096))
def crr(n):
  for _ in range(n):
    s=socket.create_connection(('$IP_B',8080)); s.sendall(b'x'); s.recv(1); s.close()
def bulk(s,mib):
  def back():
    got=0
    while got < mib<<20: got+=len(s.recv(1<<20))
  t=threading.Thread(target=back); t.start()
  for _ in range(mib): s.sendall(b'z'*(1<<20))
  t.join()
def instr(on):
  for pid in ('$CLIENT','$SERVER'):
    subprocess.run(['callgrind_control','-i',on,pid],check=True,capture_output=True)
if '$LOAD'=='order':
  crr(30); s=socket.create_connection(('$IP_B',8080)); rr(s,300); bulk(s,4)
  s.close(); crr(10)
  import time; time.sleep(2)
elif '$LOAD'=='count-bulk':
  s=socket.create_connection(('$IP_B',8080)); bulk(s,4); instr('on'); bulk(s,$COUNT); instr('off'); s.close()
elif '$LOAD'=='count-rr':
  s=socket.create_connection(('$IP_B',8080)); rr(s,50); instr('on'); rr(s,$COUNT); instr('off'); s.close()
else:
  crr(20); instr('on'); crr($COUNT); instr('off')
print('$COUNT', '$LOAD'[6:], 'measured')" >"$OUT/load.txt" &
    ;;
  *) echo "load: iperf, crr, crr8, rr1000, cpu-bulk, count-rr, count-crr or count-bulk" >&2; exit 2 ;;
esac
LOADPID=$!
if [ -n "$COUNT" ]; then
  wait $LOADPID
  kill -TERM $CLIENT $SERVER; wait $CLIENT $SERVER 2>/dev/null || true
  if [ "$LOAD" = order ]; then
    LIST="$REPO/ztunnel-bin/symbol-order.txt"
    python3 - "$ZT" "$LIST" "$OUT" <<'PY'
import glob, re, subprocess, sys
binary, out, dumps = sys.argv[1], sys.argv[2], sys.argv[3]
# Functions of this binary (text symbols), by linker name.
ours, resolvers = set(), set()
for line in subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True,
                           check=True).stdout.splitlines():
    f = line.split()
    # i: the resolvers of a statically linked libc's IFUNCs, run at start by its self-relocation.
    if len(f) == 3 and f[1] in "tTwWiI":
        ours.add(f[2])
    if len(f) == 3 and (f[1] in "iI" or f[2].endswith("_ifunc") and f[1] in "tT"):
        resolvers.add(f[2])
# Self cost per function over both proxies. Callgrind names a function once as "fn=(id) name"
# and later by "(id)" alone; cost lines follow their fn= line.
def self_cost(files):
    cost = {}
    for path in files:
        names, current, call_cost = {}, None, False
        for line in open(path, errors="replace"):
            m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(3):
                    names[m.group(2)] = m.group(3)
                if m.group(1) == "fn":
                    current = names.get(m.group(2))
                    cost.setdefault(current, 0)
            elif line.startswith("calls="):
                call_cost = True  # the next cost line is the call's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                f = line.split()
                if call_cost:
                    call_cost = False
                elif current and len(f) >= 2 and f[1].isdigit():
                    cost[current] += int(f[1])
    return cost
# Part 1 of each proxy's profile: start until ready and idle; the rest: traffic and shutdown.
# What an idle proxy runs comes first, so its pages are the first ones and no more; the
# forwarding path follows, hottest first.
# The client side's start (no policy) comes before what the server side's start (a policy) adds.
parts = sorted(glob.glob(f"{dumps}/*.callgrind*"))
first = self_cost([p for p in parts if p.endswith(".1") and "/sleep." in p])
first_policy = self_cost([p for p in parts if p.endswith(".1") and "/web-api." in p])
rest = self_cost([p for p in parts if not p.endswith(".1")])
if not first or not first_policy or not rest:
    sys.exit(f"expected two profile parts per proxy in {dumps}, found {parts}")
# Valgrind calls the C library's entry "(below main)"; give it its linker names.
for part in (first, first_policy, rest):
    if "(below main)" in part:
        for name in ("_start", "__libc_start_call_main", "__libc_start_main_impl", "__libc_start_main"):
            part[name] = part["(below main)"]
# A statically linked libc picks each string and memory function's variant by the CPU, and
# valgrind's CPU has no AVX-512: next to each variant that ran, list its siblings, so the one
# the real CPU picks (an EVEX or AVX-512 one) lies in the same block.
variant = re.compile(r"^(__[a-z0-9]+?)_(sse2|ssse3|sse4_1|sse4_2|sse42|avx|avx2|evex|evex512|avx512)(_.*)?$")
families = {}
for name in sorted(ours):
    m = variant.match(name)
    if m:
        families.setdefault(m.group(1), []).append(name)
def with_siblings(names):
    out, seen = [], set()
    for n in names:
        m = variant.match(n)
        for s in [n] + (families.get(m.group(1), []) if m else []):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out
def by_cost(part):
    return sorted((n for n in part if n in ours), key=lambda n: -part[n])
# What a native start runs and valgrind's does not: glibc sets up the vDSO (which valgrind hides
# from the program), with the dynamic linker's object and symbol lookup code (and `strcmp`); it
# runs every IFUNC resolver of the binary (valgrind's start some); `pthread_mutex_lock` (found
# by sampling the page faults of a native start: `perf record -e page-faults -d`).
native_start = ["_dl_new_object", "_dl_add_to_namespace_list", "_dl_setup_hash",
                "_dl_lookup_symbol_x", "do_lookup_x", "check_match", "__strcmp_evex",
                "pthread_mutex_lock"] + sorted(resolvers)
start = with_siblings(by_cost(first) + [n for n in native_start if n in ours]
                      + by_cost(first_policy))
ran = with_siblings(start + by_cost(rest))
with open(out, "w") as f:
    f.write("\n".join(ran) + "\n")
print(f"{len(ran)} functions ({len(start)} run by the time a proxy is ready) written to {out}")
PY
    exit 0
  fi
  case "$LOAD" in count-rr) unit="1 KiB round trip" ;; count-bulk) unit="MiB echoed" ;; *) unit=connection ;; esac
  for side in client server; do
    total=$(sed -n 's/^totals: //p' "$OUT/$([ $side = client ] && echo sleep || echo web-api).callgrind")
    echo "$side side: $((total / COUNT)) instructions per $unit ($total over $COUNT)"
  done
  echo "reports (callgrind_annotate): $OUT/sleep.callgrind (client) $OUT/web-api.callgrind (server)"
  exit 0
fi
sleep 1
if [ -n "${SYSCALLS:-}" ]; then
  strace -f -c -o "$OUT/client.strace" -p $CLIENT 2>/dev/null & ST1=$!
  strace -f -c -o "$OUT/server.strace" -p $SERVER 2>/dev/null & ST2=$!
  wait $LOADPID || true
  kill -INT $ST1 $ST2; wait $ST1 $ST2 2>/dev/null || true
  tail -4 "$OUT/load.txt"
  for side in client server; do echo "=== $side side, system calls"; head -25 "$OUT/$side.strace"; done
  exit 0
fi
perf record -F 499 --call-graph "${CALLGRAPH:-dwarf,32768}" -o "$OUT/client.data" -p $CLIENT -- sleep $((SECS - 2)) >/dev/null 2>&1 &
perf record -F 499 --call-graph "${CALLGRAPH:-dwarf,32768}" -o "$OUT/server.data" -p $SERVER -- sleep $((SECS - 2)) >/dev/null 2>&1 &
wait $LOADPID || true
sleep 1
tail -4 "$OUT/load.txt"
for side in client server; do
  echo "=== $side side, self time (perf report --no-children)"
  perf report -i "$OUT/$side.data" --no-children --percent-limit 1.5 --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -30
done
echo "reports: $OUT"
