#!/usr/bin/env bash
# Builds the `ztunnel` binary we ship: the `dist` profile (release with whole-program LTO), its
# functions in the order ztunnel-bin/symbol-order.txt lists (ztunnel-bin/build.rs), and linked
# statically against glibc (a static PIE) with packed relative relocations.
#
#   scripts/dist.sh                    -> target/dist/ztunnel (or $CARGO_TARGET_DIR/dist/ztunnel)
#   ZTUNNEL_STATIC=0 scripts/dist.sh   -> the same profile linked dynamically, as
#                                         `cargo build --profile dist -p ztunnel` links it
#
# Why static: an idle proxy then maps only the pieces of the C library it runs, laid out with
# its own code, instead of four shared objects each mapped around every page their loader and
# IFUNC resolvers touch; with the relocations packed as well, an idle proxy's RSS drops from
# about 6.3 to 4.5 MiB (BENCHMARKS.md, issue 12, lever 26). The binary needs no particular glibc
# where it runs (the dynamic one needs 2.34 or later).
#
# What a static glibc changes for operators (README, "Decisions", "The binary we ship"): host
# names resolve through /etc/hosts and DNS (nsswitch's `files` and `dns`, built in); other NSS
# modules named in /etc/nsswitch.conf cannot be loaded safely by a static program, so use the
# dynamic build where names must resolve through them. A glibc security fix reaches the proxy
# by rebuilding it, not by updating the host's or image's libc.
#
# Needs: glibc's static libraries where it builds (Debian: libc6-dev), and rustc's own linker
# (rustc 1.90 or later on x86_64 Linux). Packed relocations need glibc 2.36 or later where it
# builds (the static start-up code that applies them); with an older glibc they are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${CARGO_TARGET_DIR:-target}/dist/ztunnel"

flags=()
if [ "${ZTUNNEL_STATIC:-1}" != 0 ]; then
  libc_a=$(cc -print-file-name=libc.a)
  if [ "$libc_a" = libc.a ] || [ ! -f "$libc_a" ]; then
    echo "scripts/dist.sh: glibc's static library (libc.a) is missing; install libc6-dev, or build with ZTUNNEL_STATIC=0" >&2
    exit 1
  fi
  flags+=(-C target-feature=+crt-static)
  glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
  if [ "$(printf '%s\n' 2.36 "$glibc" | sort -V | head -1)" = 2.36 ]; then
    flags+=(-C link-arg=-Wl,-z,pack-relative-relocs)
  else
    echo "scripts/dist.sh: glibc $glibc is older than 2.36: relocations left unpacked" >&2
  fi
fi

# `cargo rustc` hands the flags to the binary's own compilation and link only: the libraries are
# the same as for `cargo build --profile dist` (and proc macros, which cannot be static, are not
# touched), so the two builds share everything but the last step.
cargo rustc --profile dist -p ztunnel --bin ztunnel -- "${flags[@]}"

"$out" --version >/dev/null

# The link order only helps while its names are this build's: a crate's new dependency renames
# every symbol of that crate and those above it (7.0 instead of 4.4 MB idle once), and any code
# change can renumber the link-time optimizer's local names (`name.1234`); three such names of
# start-up code missing cost 0.3 MB per proxy once. Say so whenever a name is missing.
list=ztunnel-bin/symbol-order.txt
if [ "${ZTUNNEL_STATIC:-1}" != 0 ] && [ -f "$list" ]; then
  listed=$(LC_ALL=C sort -u "$list" | wc -l)
  present=$(nm --defined-only "$out" | awk '{print $3}' | LC_ALL=C sort -u \
    | LC_ALL=C comm -12 - <(LC_ALL=C sort -u "$list") | wc -l)
  if [ "$present" -lt "$listed" ]; then
    echo "scripts/dist.sh: $((listed - present)) of the $listed functions $list names are not in" \
      "this build, so they are linked out of order (up to 64 KB of idle RSS each); regenerate" \
      "the list: ZT=$out scripts/profile.sh order && scripts/dist.sh" >&2
  fi
fi
headers=$(readelf -lSW "$out")
if grep -q INTERP <<<"$headers"; then kind="dynamically linked"; else kind="static PIE"; fi
if grep -q '\.relr\.dyn' <<<"$headers"; then kind="$kind, packed relocations"; fi
echo "built $out ($kind)"
