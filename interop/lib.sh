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
