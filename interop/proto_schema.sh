#!/usr/bin/env bash
# Our .proto files against Istio's, message by message and field by field (outside CI: it needs a
# checkout of Istio's ztunnel, whose proto/ directory holds the schemas istiod speaks to it).
#
# Every message, enum and RPC our files declare must be in Istio's with the same fields (number,
# name, type, label, `optional`, oneof) and values; every item of Istio's must be ours too, but
# for the state-of-the-world xDS messages we leave out on purpose. Exit 0: the same schema.
#
# Usage (from this repository's root):
#   ISTIO_SRC=/path/to/istio-ztunnel-checkout interop/proto_schema.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${ISTIO_SRC:?set ISTIO_SRC to a checkout of the Istio ztunnel source, whose proto directory is compared}"
cd "$REPO"
cargo run -q -p protogen -- compare "$ISTIO_SRC/proto"
